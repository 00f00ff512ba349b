"""`hangup` DIALSTATUS ANSWEREDTIME [RECORDING]: queue the finish exactly once, then the recording."""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Tuple

from agi_bitrix import talktime
from agi_bitrix.bitrix import payloads
from agi_bitrix.controllers.base import EventContext, Outcome, Refused
from agi_bitrix.statuses import status_code

_NOT_ANSWERED = {"NOANSWER", "CANCEL", "BUSY", "CHANUNAVAIL", "CONGESTION"}
# Queue() sets no DIALSTATUS; QUEUESTATUS says why the caller left it (Asterisk apps/app_queue.c).
# It stays unset when the caller hung up while waiting, and ABANDONED=TRUE marks any exit
# without an agent: both together mean the caller gave up.
_QUEUE_NOBODY = {"TIMEOUT", "FULL", "JOINEMPTY", "LEAVEEMPTY", "JOINUNAVAIL", "LEAVEUNAVAIL", "CONTINUE",
                 "WITHDRAW"}


def _recording(ctx: EventContext, path: str) -> Optional[Dict[str, Any]]:
    """The recording to attach, or None with the reason logged (Bitrix24 takes only wav and mp3)."""
    name = os.path.basename(path)
    if not os.path.isabs(path) or not re.fullmatch(r"[A-Za-z0-9._\-]{1,200}", name):
        ctx.log["recording_note"] = "recording path must be absolute and its name plain (letters, digits, ._-)"
        return None
    if not name.lower().endswith((".wav", ".mp3")):
        ctx.log["recording_note"] = f"{name}: Bitrix24 accepts only wav and mp3 recordings"
        return None
    return {"path": path, "name": name}


def finish_of(settings: Any, call: Any, dialstatus: str, answeredtime: Optional[int] = None,
              ended: Optional[float] = None) -> Tuple[Dict[str, Any], List[str]]:
    """The finish of one call (part), CALL_ID left out, and the other employees whose card is up.

    `answeredtime`: Asterisk's ANSWEREDTIME, trusted for an answered part (talktime.py says when).
    `ended`: when the part ended; None = unknown (a hangup never reported): talk time 0 unless
    Asterisk counted it.
    """
    answered = call.answered_at is not None
    if answered:
        duration = talktime.talk_seconds(call.answered_at if ended is not None else None,
                                         ended if ended is not None else 0.0, answeredtime)
    else:
        duration = (answeredtime or 0) if dialstatus.upper() == "ANSWER" else 0
    code = status_code(dialstatus, call.direction, answered)
    if answered and call.answered_inner and call.direction == "incoming":
        user = call.answered_inner
    elif not answered and call.direction == "incoming" and settings.calls.missed_calls_user:
        user = settings.calls.missed_calls_user  # who follows up missed calls
    else:
        user = call.user_inner
    params = payloads.finish(CALL_ID="", USER_PHONE_INNER=user, DURATION=duration, STATUS_CODE=code,
                             FAILED_REASON=None if code == "200" else dialstatus or None)
    del params["CALL_ID"]  # known only once the register is delivered
    # finish hides the card of its own employee only; everyone else who still sees it is hidden here.
    hide = [u for u in call.shown if u != user] if call.direction == "incoming" else []
    return params, hide


def queue_part_finish(ctx: EventContext, key: str, call: Any, dialstatus: str,
                      answeredtime: Optional[int] = None, recording: Optional[Dict[str, Any]] = None) -> List[int]:
    """Queue the finish of one call (or call part), exactly once, for the right employee; the
    entries journaled (none when another leg queued it already)."""
    params, hide = finish_of(ctx.settings, call, dialstatus, answeredtime, ended=ctx.clock())
    ctx.log.update(direction=call.direction, dialstatus=dialstatus, status_code=params["STATUS_CODE"],
                   duration=params["DURATION"], user=params["USER_PHONE_INNER"])
    ids = ctx.store.queue_finish(key, params, recording, ctx.outbox.owner, ctx.lease, hide=hide)
    if ids is None:
        ctx.log["note"] = "finish already queued by another leg"
    return list(ids or [])


def read_answeredtime(ctx: EventContext, raw: Optional[str]) -> Optional[int]:
    """ANSWEREDTIME as given (or read from the channel); junk is logged and ignored."""
    if raw is None:
        raw = ctx.session.get_variable("ANSWEREDTIME") or ""
    seconds = talktime.parse_seconds(raw)
    if seconds is None and raw.strip():
        ctx.log["answeredtime_note"] = f"ignored ANSWEREDTIME {raw[:40]!r} (not a number of seconds)"
    return seconds


def _queue_outcome(ctx: EventContext) -> str:
    """The DIALSTATUS equivalent of how the caller left a Queue(), or '' when no queue ran."""
    queuestatus = (ctx.session.get_variable("QUEUESTATUS") or "").strip().upper()
    abandoned = (ctx.session.get_variable("ABANDONED") or "").strip().upper() == "TRUE"
    if queuestatus:
        ctx.log["queuestatus"] = queuestatus[:20]
    if queuestatus in _QUEUE_NOBODY:
        if queuestatus in ("JOINEMPTY", "LEAVEEMPTY", "JOINUNAVAIL", "LEAVEUNAVAIL"):
            ctx.log["queue_note"] = f"the queue had no member to take the call ({queuestatus})"
        return "NOANSWER"
    if abandoned:
        return "CANCEL"  # the caller hung up while the members' phones rang
    return ""


def handle(ctx: EventContext) -> Outcome:
    # No arguments: read what Dial left on the channel (works on a dead channel too).
    dialstatus = ctx.arg(1) if ctx.args else (ctx.session.get_variable("DIALSTATUS") or "")
    answeredtime = read_answeredtime(ctx, ctx.arg(2) if len(ctx.args) >= 2 else None)
    recording = _recording(ctx, ctx.arg(3)) if ctx.arg(3) else None
    if not re.fullmatch(r"[A-Za-z]{0,20}", dialstatus):
        ctx.log["dialstatus_note"] = f"ignored DIALSTATUS {dialstatus[:40]!r}"
        dialstatus = "?"
    if ctx.linkedid.startswith("dialer-"):
        return _dialer_hangup(ctx, dialstatus, answeredtime)
    key = ctx.store.active_key(ctx.linkedid)  # after a transfer, the part now going on
    call = ctx.store.call(key)
    if call is None:
        # A call refused before it was registered (a bad *9 number, say): nothing to finish.
        ctx.log["note"] = "no call was registered for this linkedid: nothing to finish"
        return Outcome(deliver=[key])
    answered = call.answered_at is not None
    if answered and dialstatus.upper() in _NOT_ANSWERED:
        # A leg that never reached an employee (a queue member's unanswered ring, an IVR branch)
        # must not overwrite the outcome of the leg that answered: its hangup finishes the call.
        ctx.log["note"] = f"{dialstatus} from a leg that did not answer; the answered leg finishes the call"
        return Outcome(deliver=[key])
    if not dialstatus and not answered:
        dialstatus = _queue_outcome(ctx)
    return Outcome(queued=queue_part_finish(ctx, key, call, dialstatus, answeredtime, recording), deliver=[key])


# DIALSTATUS of the dialer's second Dial (operator_first: the client) -> attempt outcome
_DIAL_OUTCOMES = {"BUSY": "busy", "NOANSWER": "noanswer", "CHANUNAVAIL": "unreachable", "CONGESTION": "congestion"}


def _dialer_hangup(ctx: EventContext, dialstatus: str, answeredtime: Optional[int]) -> Outcome:
    """End of an answered dialer call: connected, or who was missing."""
    from agi_bitrix.dialer import outcomes
    from agi_bitrix.dialer.state import dialer_state

    dstate = dialer_state(ctx.store)
    attempt = dstate.attempt(ctx.linkedid)
    if attempt is None:
        raise Refused("no dialer attempt is known for this linkedid")
    call = ctx.store.call(ctx.linkedid)
    duration = 0
    if attempt.state == "connected" and call is not None and call.answered_at:
        outcome = "connected"
        duration = talktime.talk_seconds(call.answered_at, ctx.clock(),
                                         answeredtime if dialstatus.upper() == "ANSWER" else None)
    elif attempt.mode == "client_first":
        outcome = "nooperator"  # the client answered, nobody took him: not the client's attempt
    else:
        outcome = _DIAL_OUTCOMES.get(dialstatus.upper(), "failed")
    ctx.log.update(task=attempt.task_id, outcome=outcome, duration=duration, dialstatus=dialstatus)
    if outcomes.record_outcome(ctx.store, dstate, ctx.settings, ctx.linkedid, outcome, ctx.outbox.owner,
                               duration) is None:
        ctx.log["note"] = "outcome already recorded"
    return Outcome(queued=[e.id for e in ctx.store.entries(ctx.linkedid, "pending")])
