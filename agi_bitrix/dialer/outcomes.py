"""Writing a dial attempt's outcome back to Bitrix24, through the outbox.

The same functions serve the dialer loop (an Originate that failed), the `dialer-failed` step
(the dialplan's `failed` extension) and the `hangup` step of an answered attempt; whichever
comes first records the outcome, the others find the attempt closed.
"""
from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo
from typing import TYPE_CHECKING, Any, List, Optional, Tuple
from urllib.parse import urlsplit

from agi_bitrix.bitrix import payloads
from agi_bitrix.dialer import policy
from agi_bitrix.dialer.state import Attempt, DialerState, TaskState
from agi_bitrix.dialer.texts import text
from agi_bitrix.store import Store

if TYPE_CHECKING:
    from agi_bitrix.settings import Settings

LEASE = 30.0


def portal_base(settings: Settings) -> str:
    url = settings.bitrix24.webhook_url or settings.bitrix24.portal_url
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else ""


def task_url(settings: Settings, task_id: int, user_id: int) -> str:
    return f"{portal_base(settings)}/company/personal/user/{user_id}/tasks/task/view/{task_id}/"


def comment(task_id: int, message: str) -> Tuple[str, Any]:
    # task.commentitem.add is order-sensitive (Bitrix24 REST docs: data encoding): TASKID must come before FIELDS.
    return "task.commentitem.add", {"TASKID": task_id, "FIELDS": {"POST_MESSAGE": message}}


def _when(ts: float, zone: str) -> str:
    """A time as the operator reads it: in [dialer] timezone, the zone named (the PBX may run on UTC)."""
    return datetime.fromtimestamp(ts, ZoneInfo(zone)).strftime("%d.%m.%Y %H:%M") + f" ({zone})"


def register_attempt(store: Store, settings: Settings, attempt: Attempt, show: bool, owner: str) -> None:
    """Log the attempt as a call of the operator, on the dialer's line, bound to the task's client."""
    info = attempt.info
    payload = payloads.register(
        USER_PHONE_INNER=attempt.operator, PHONE_NUMBER=attempt.phone, TYPE=payloads.CallType.OUTGOING,
        CALL_START_DATE=payloads.iso(attempt.started_at), CRM_CREATE=0,
        CRM_ENTITY_TYPE=info.get("crm_type"), CRM_ENTITY_ID=info.get("crm_id"),
        LINE_NUMBER=settings.dialer.line_number, EXTERNAL_CALL_ID=attempt.attempt_id, SHOW=int(show))
    store.start_call(attempt.attempt_id, "outgoing", attempt.phone, settings.dialer.line_number, attempt.operator,
                     payload, owner, LEASE)


def note_once(state: TaskState, key: str) -> bool:
    """True the first time `key` is noted for the task: a comment is written once, not every pass."""
    if key in state.notes:
        return False
    state.notes.append(key)
    return True


def task_writes_for(outcome: str, attempt: Attempt, state: TaskState, settings: Settings,
                    duration: int = 0) -> List[Tuple[str, Any]]:
    """Update the task's memory for this outcome; return the Bitrix24 writes it needs."""
    d, now = settings.dialer, time.time()
    info = attempt.info
    values = dict(client=info.get("client", ""), phone=attempt.phone, operator=info.get("operator_name", ""),
                  duration=duration)
    state.last_outcome, state.last_attempt = outcome, attempt.started_at
    writes: List[Tuple[str, Any]] = []
    if outcome == "connected":
        state.final = now  # the operator has it now; a deadline moved later re-opens the task
        writes.append(comment(attempt.task_id, text(d.language, "connected", **values)))
    elif outcome in policy.COUNTED:
        state.attempts += 1
        message = text(d.language, outcome, **values)
        if state.attempts >= d.max_attempts:
            state.final = now
            message += text(d.language, "final", attempt=state.attempts, max=d.max_attempts)
        else:
            state.next_try = now + policy.retry_after(outcome, d)
            message += text(d.language, "next", attempt=state.attempts, max=d.max_attempts,
                            when=_when(state.next_try, d.operator_timezone))
            writes.append(("tasks.task.update", {"taskId": attempt.task_id,
                                                  "fields": {"DEADLINE": payloads.iso(state.next_try)}}))
        writes.append(comment(attempt.task_id, message))
    else:
        state.next_try = now + d.retry_ours  # congestion, nobody to connect, our own failure
    return writes


def record_outcome(store: Store, dstate: DialerState, settings: Settings, attempt_id: str, outcome: str,
                   owner: str, duration: int = 0) -> Optional[Attempt]:
    """Close the attempt with `outcome` (once), log the call, write the task; None if already closed."""
    if not dstate.close_attempt(attempt_id, outcome):
        return None
    attempt = dstate.attempt(attempt_id)
    if attempt is None:
        return None
    call = store.call(attempt_id)
    if outcome in policy.COUNTED or outcome in {"connected", "nooperator"}:
        if call is None:
            register_attempt(store, settings, attempt, show=False, owner=owner)
        finish = {"USER_PHONE_INNER": attempt.operator, "DURATION": duration,
                  "STATUS_CODE": policy.STATUS_CODES[outcome]}
        if outcome != "connected":
            finish["FAILED_REASON"] = outcome
        store.queue_finish(attempt_id, finish, None, owner, LEASE)
    state = dstate.task(attempt.task_id)
    writes = task_writes_for(outcome, attempt, state, settings, duration)
    dstate.save_task(state)
    if writes:
        store.queue_rest(attempt_id, writes, owner, LEASE)
    return attempt
