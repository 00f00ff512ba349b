"""What a call card may show, read from the local state (the dialer's attempts and the calls table).

Only the operator's own calls: a dialer attempt connects to its operator (by user id or inner
number), an ordinary call to the employee it was registered for, shown to or answered by.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Optional

from agi_bitrix.dialer import policy
from agi_bitrix.dialer.state import Attempt, TaskState, dialer_state
from agi_bitrix.placements.identity import Operator
from agi_bitrix.store import Call, Store

RECENT = 4 * 3600.0  # a card is only opened during (or right after) its call
LAST_CALLS = 5


def digits(number: str) -> str:
    """Compare numbers by their last ten digits: the card may show +7..., 7... or 8..."""
    return re.sub(r"\D", "", number or "")[-10:]


@dataclass
class DialerCard:
    attempt: Attempt
    task: TaskState
    number: int                 # this attempt's number (1-based)
    history: List[Dict[str, Any]] = field(default_factory=list)  # this task's attempts, newest first

    def client_time(self, zone_default: str, now: Optional[float] = None) -> datetime:
        zone = policy.client_zone(self.attempt.phone, zone_default)
        return datetime.fromtimestamp(now or time.time(), zone)


@dataclass
class OrdinaryCard:
    call: Call
    last: List[Call] = field(default_factory=list)


def _own_attempt(attempt: Attempt, operator: Operator) -> bool:
    if int(attempt.info.get("operator_id") or 0) == operator.user_id:
        return True
    return bool(operator.inner) and attempt.operator == operator.inner


def _own_call(call: Call, operator: Operator) -> bool:
    return bool(operator.inner) and operator.inner in {call.user_inner, call.answered_inner, *call.shown}


def _rows(store: Store, sql: str, args: Any) -> List[Any]:
    """A read in either engine (the shared store's placeholders are %s; its calls carry the PBX,
    its dialer's tables are every PBX's)."""
    if getattr(store, "engine", "sqlite") == "postgresql":
        if " FROM calls " in sql:
            sql = sql.replace(" WHERE ", " WHERE pbx = ? AND ", 1)
            args = (store.pbx, *args)  # type: ignore[attr-defined]
        return store._q(sql.replace("?", "%s"), args).fetchall()  # type: ignore[attr-defined]
    return store.db.execute(sql, args).fetchall()


def _call_by_id(store: Store, call_id: str) -> Optional[Call]:
    if not call_id:
        return None
    rows = _rows(store, "SELECT linkedid FROM calls WHERE call_id = ? ORDER BY started_at DESC LIMIT 1", (call_id,))
    return store.call(rows[0]["linkedid"]) if rows else None


def dialer_card(store: Store, operator: Operator, call_id: str, phone: str) -> Optional[DialerCard]:
    """The dialer attempt behind this card, if it is one of this operator's."""
    state = dialer_state(store)
    attempt: Optional[Attempt] = None
    call = _call_by_id(store, call_id)
    if call is not None:
        attempt = state.attempt(call.linkedid)
    elif digits(phone):
        # The card can open before the register answer (and its CALL_ID) is stored: the
        # operator's latest attempt to this number stands in.
        rows = _rows(store, "SELECT attempt_id, phone FROM dialer_attempts WHERE started_at > ?"
                     " ORDER BY started_at DESC", (time.time() - RECENT,))
        for row in rows:
            candidate = state.attempt(row["attempt_id"])
            if candidate and digits(row["phone"]) == digits(phone) and _own_attempt(candidate, operator):
                attempt = candidate
                break
    if attempt is None or not _own_attempt(attempt, operator):
        return None
    task = state.task(attempt.task_id)
    number = task.attempts if attempt.outcome in policy.COUNTED else task.attempts + 1
    rows = _rows(store, "SELECT attempt_id, started_at, state, outcome, operator, info FROM dialer_attempts"
                 " WHERE task_id = ? ORDER BY started_at DESC LIMIT 10", (attempt.task_id,))
    history = []
    for row in rows:
        other = state.attempt(row["attempt_id"])
        history.append({"started_at": row["started_at"], "outcome": row["outcome"] or "live",
                        "operator": (other.info.get("operator_name") if other else "") or row["operator"],
                        "current": row["attempt_id"] == attempt.attempt_id})
    return DialerCard(attempt, task, max(1, number), history)


def ordinary_card(store: Store, operator: Operator, call_id: str) -> Optional[OrdinaryCard]:
    """An ordinary call of this operator, with the last calls of the same client."""
    call = _call_by_id(store, call_id)
    if call is None or not _own_call(call, operator):
        return None
    wanted = digits(call.phone)
    rows = _rows(store, "SELECT linkedid, phone FROM calls WHERE linkedid != ? ORDER BY started_at DESC"
                 " LIMIT 500", (call.linkedid,))
    last = [c for c in (store.call(r["linkedid"]) for r in rows if wanted and digits(r["phone"]) == wanted) if c]
    return OrdinaryCard(call, last[:LAST_CALLS])
