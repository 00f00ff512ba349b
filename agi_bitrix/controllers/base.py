"""What every controller gets (EventContext) and gives back (Outcome)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from agi_bitrix.agi import variables as V
from agi_bitrix.agi.session import AGISession
from agi_bitrix.controllers import Refused  # noqa: F401 - controllers raise it from here
from agi_bitrix.deadline import Deadline
from agi_bitrix.outbox import Outbox
from agi_bitrix.settings import Settings
from agi_bitrix.store import DEAD, PENDING, Store


@dataclass
class Outcome:
    status: str = V.OK
    call_id: Optional[str] = None
    responsible: Optional[str] = None  # set only by `incoming`
    reason: str = ""


@dataclass
class EventContext:
    event: str
    args: List[str]
    session: AGISession
    settings: Settings
    store: Store
    outbox: Outbox
    deadline: Deadline
    linkedid: str
    log: Dict[str, Any] = field(default_factory=dict)  # extra fields for the event's log line
    queued: List[int] = field(default_factory=list)    # outbox entries this event wrote
    keys: List[str] = field(default_factory=list)      # outbox keys to deliver (default: the linkedid)
    clock: Callable[[], float] = time.time              # wall clock of answers and talk time (tests move it)

    def arg(self, index: int) -> str:
        """Positional argument (1-based); missing = empty, as the contract's defaults expect."""
        return self.args[index - 1].strip() if len(self.args) >= index else ""

    def env(self, key: str) -> str:
        value = self.session.env.get(key, "")
        return "" if value == "unknown" else value

    @property
    def bitrix(self) -> Any:
        return self.outbox.client

    @property
    def lease(self) -> float:
        """How long this step may hold its entries before a flusher may take them over."""
        return self.deadline.remaining() + 5.0

    def settle(self, outcome: Outcome, deliver: bool = True) -> Outcome:
        """Deliver what is due for this call within the budget; status from this event's entries.

        OK: everything this step queued reached Bitrix24. QUEUED: kept in the outbox for later
        delivery. ERROR: an entry was dead-lettered (reason in the log). `deliver=False` only
        reads the journal (no network): the status of a step that delivers after returning.
        """
        if deliver:
            for key in self.keys or [self.linkedid]:
                self.outbox.deliver_call(key, self.deadline, lease=self.lease)
        entries = self.store.entry_states(self.queued)
        call = self.store.call(self.store.active_key(self.linkedid))
        outcome.call_id = call.call_id if call else None
        dead = [e for e in entries.values() if e.state == DEAD]
        if dead:
            outcome.status, outcome.reason = V.ERROR, f"{dead[0].kind} dead-lettered: {dead[0].last_error}"
        elif any(e.state == PENDING for e in entries.values()) or (call is not None and not call.call_id):
            outcome.status = V.QUEUED
            waiting = [e for e in entries.values() if e.state == PENDING and e.last_error]
            if waiting:
                outcome.reason = f"kept in the outbox: {waiting[0].last_error}"
        if outcome.status == V.QUEUED:
            self.log["queued"] = sorted(e.kind for e in entries.values() if e.state == PENDING)
        return outcome

    def publish(self, outcome: Outcome) -> None:
        """Set the contract's channel variables now (before a blocking Dial, say)."""
        V.publish(self.session, outcome.status, outcome.call_id or "", outcome.responsible)
