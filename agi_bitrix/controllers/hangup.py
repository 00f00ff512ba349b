"""`hangup` DIALSTATUS ANSWEREDTIME [RECORDING]: finish the call exactly once, then attach the recording."""
from __future__ import annotations

import math
import re
import time

from agi_bitrix.bitrix import payloads
from agi_bitrix.bitrix.errors import BitrixError, NotFoundError
from agi_bitrix.controllers.base import EventContext, Outcome, Refused
from agi_bitrix.controllers.recording import attach_recording
from agi_bitrix.statuses import status_code

MAX_SECONDS = 7 * 24 * 3600


def _seconds(raw: str) -> int:
    return min(int(raw), MAX_SECONDS) if re.fullmatch(r"[0-9]{1,9}", raw or "") else 0


def handle(ctx: EventContext) -> Outcome:
    # No arguments: read what Dial left on the channel (works on a dead channel too).
    dialstatus = ctx.arg(1) if ctx.args else (ctx.session.get_variable("DIALSTATUS") or "")
    answered_time = ctx.arg(2) if len(ctx.args) >= 2 else (ctx.session.get_variable("ANSWEREDTIME") or "")
    recording = ctx.arg(3)
    if not re.fullmatch(r"[A-Za-z]{0,20}", dialstatus):
        ctx.log["dialstatus_note"] = f"ignored DIALSTATUS {dialstatus[:40]!r}"
        dialstatus = "OTHER_VALUE"
    call = ctx.store.call(ctx.linkedid)
    if call is None:
        raise Refused("no call is known for this linkedid (did `incoming` or `outgoing` run?)")
    ctx.log.update(direction=call.direction, dialstatus=dialstatus)
    if call.finished_at is not None or not ctx.store.claim_finish(ctx.linkedid):
        ctx.log["note"] = "already finished by another leg"
        return Outcome(call_id=call.call_id)

    answered = call.answered_at is not None
    if answered:
        duration = int(math.ceil(max(0.0, time.time() - call.answered_at)))
    else:
        duration = _seconds(answered_time) if dialstatus.upper() == "ANSWER" else 0
    code = status_code(dialstatus if dialstatus != "OTHER_VALUE" else "?", call.direction, answered)
    user = call.answered_inner if (answered and call.answered_inner and call.direction == "incoming") \
        else call.user_inner
    ctx.log.update(status_code=code, duration=duration, user=user)
    if not call.call_id:
        ctx.store.release_finish(ctx.linkedid)
        ctx.log["payload"] = {"USER_PHONE_INNER": user, "DURATION": duration, "STATUS_CODE": code,
                              "PHONE_NUMBER": call.phone}
        raise Refused("the call was never registered in Bitrix24, it cannot be finished")
    payload = payloads.Finish(CALL_ID=call.call_id, USER_PHONE_INNER=user, DURATION=duration,
                              STATUS_CODE=code, FAILED_REASON=None if code == "200" else dialstatus or None)
    try:
        ctx.bitrix.call(payloads.FINISH, payload.params(), ctx.deadline)
    except NotFoundError as exc:
        # Finished already: an earlier attempt reached the portal but its answer did not reach us.
        ctx.log["note"] = f"portal says {exc.description or exc.code}; taken as finished"
    except BitrixError as exc:
        ctx.store.release_finish(ctx.linkedid)
        ctx.log["payload"] = payload.params()
        raise Refused(f"finish failed: {exc.summary()}") from None
    ctx.store.mark_finished(ctx.linkedid, code, duration)
    if recording:
        attach_recording(ctx, call.call_id, recording)
    return Outcome(call_id=call.call_id)
