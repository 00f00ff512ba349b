"""Attaching a call recording after finish (reference §5.5: wav or mp3 only)."""
from __future__ import annotations

import base64
import os
import re

from agi_bitrix.bitrix import payloads
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.controllers.base import EventContext

INLINE_MAX = 5 * 1024 * 1024  # larger files go through the two-step uploadUrl


def attach_recording(ctx: EventContext, call_id: str, path: str) -> bool:
    """Attach the file; on any problem log why and return False (the call itself is finished)."""
    name = os.path.basename(path)
    if not os.path.isabs(path) or not re.fullmatch(r"[A-Za-z0-9._\-]{1,200}", name):
        ctx.log["recording_note"] = "recording path must be absolute and its name plain (letters, digits, ._-)"
        return False
    if not name.lower().endswith((".wav", ".mp3")):
        ctx.log["recording_note"] = f"{name}: Bitrix24 accepts only wav and mp3 recordings"
        return False
    try:
        size = os.path.getsize(path)
        if size == 0:
            ctx.log["recording_note"] = f"{name} is empty"
            return False
        with open(path, "rb") as fh:
            content = fh.read() if size <= INLINE_MAX else None
    except OSError as exc:
        ctx.log["recording_note"] = f"cannot read {name}: {exc.strerror}"
        return False
    try:
        if content is not None:
            payload = payloads.AttachRecord(CALL_ID=call_id, FILENAME=name,
                                            FILE_CONTENT=base64.b64encode(content).decode("ascii"))
            ctx.bitrix.call(payloads.ATTACH_RECORD, payload.params(), ctx.deadline)
        else:
            answer = ctx.bitrix.call(payloads.ATTACH_RECORD, {"CALL_ID": call_id, "FILENAME": name}, ctx.deadline)
            with open(path, "rb") as fh:
                ctx.bitrix.upload(answer["uploadUrl"], answer.get("fieldName", "file"), name, fh, ctx.deadline)
    except (BitrixError, KeyError, TypeError, OSError) as exc:
        ctx.log["recording_note"] = f"recording not attached: {getattr(exc, 'summary', lambda: str(exc))()}"
        return False
    ctx.log["recording"] = name
    return True
