"""What every controller gets (EventContext) and gives back (Outcome).

A controller reads the event, decides, journals what Bitrix24 must learn, and returns what it
did; the dispatcher alone delivers, settles the status and talks to the channel, once, the same
way for both transports.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from agi_bitrix.agi import variables as V
from agi_bitrix.agi.session import AGISession
from agi_bitrix.controllers import Refused  # noqa: F401 - controllers raise it from here
from agi_bitrix.deadline import Deadline
from agi_bitrix.outbox import Outbox
from agi_bitrix.store import Store

if TYPE_CHECKING:
    from agi_bitrix.settings import Settings


@dataclass
class Outcome:
    status: str = V.OK
    call_id: Optional[str] = None
    responsible: Optional[str] = None  # set only by `incoming`
    reason: str = ""
    queued: List[int] = field(default_factory=list)          # outbox entries this step journaled
    deliver: List[str] = field(default_factory=list)         # outbox keys to deliver (default: the linkedid)
    variables: Dict[str, str] = field(default_factory=dict)  # channel variables for the dialplan
    dial: Optional[str] = None  # Dial(options) once the status is on the channel (it blocks for the call)


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
    clock: Callable[[], float] = time.time              # wall clock of answers and talk time (tests move it)
    journal_only: bool = False  # on the local journal while the shared store (PostgreSQL) is away

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
