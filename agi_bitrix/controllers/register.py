"""Registering a call in Bitrix24, shared by `incoming`, `outgoing` and `dial`."""
from __future__ import annotations

import time

from agi_bitrix.bitrix import payloads
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.controllers.base import EventContext, Refused

_TYPES = {"incoming": payloads.CallType.INCOMING, "outgoing": payloads.CallType.OUTGOING}


def register_call(ctx: EventContext, direction: str, user: str, phone: str, line: str) -> str:
    """Record the call locally, then register it for employee `user`; returns the CALL_ID.

    A call already registered under this linkedid (another leg ran the same event) keeps its
    CALL_ID: EXTERNAL_CALL_ID = linkedid makes Bitrix24 answer with the same one anyway.
    """
    calls = ctx.settings.calls
    call = ctx.store.start_call(ctx.linkedid, direction, phone, line, user, time.time())
    ctx.log.update(phone=phone, user=user, line=line)
    if call.call_id:
        return call.call_id
    payload = payloads.Register(
        USER_PHONE_INNER=user, PHONE_NUMBER=phone, TYPE=_TYPES[direction],
        CALL_START_DATE=payloads.iso(call.started_at), CRM_CREATE=int(calls.crm_create and phone != calls.anonymous_number),  # no lead for "nobody"
        LINE_NUMBER=line or None, EXTERNAL_CALL_ID=ctx.linkedid, SHOW=1)
    try:
        result = ctx.bitrix.call(payloads.REGISTER, payload.params(), ctx.deadline)
        call_id = payloads.call_id_of(result)
    except (BitrixError, ValueError) as exc:
        ctx.log["payload"] = payload.params()
        raise Refused(f"register failed: {getattr(exc, 'summary', lambda: str(exc))()}") from None
    ctx.store.set_call_id(ctx.linkedid, call_id)
    if isinstance(result, dict) and result.get("CRM_CREATED_LEAD"):
        ctx.log["lead_created"] = result["CRM_CREATED_LEAD"]
    return call_id
