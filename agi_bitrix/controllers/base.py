"""What every controller gets (EventContext) and gives back (Outcome)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from agi_bitrix.agi import variables as V
from agi_bitrix.agi.session import AGISession
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.deadline import Deadline
from agi_bitrix.settings import Settings
from agi_bitrix.store import Store


class Refused(Exception):
    """The event cannot be carried out (bad input, unknown call): BITRIX_STATUS=ERROR, reason logged."""


@dataclass
class EventContext:
    event: str
    args: List[str]
    session: AGISession
    settings: Settings
    store: Store
    bitrix: Bitrix24
    deadline: Deadline
    linkedid: str
    log: Dict[str, Any] = field(default_factory=dict)  # extra fields for the event's log line

    def arg(self, index: int) -> str:
        """Positional argument (1-based); missing = empty, as the contract's defaults expect."""
        return self.args[index - 1].strip() if len(self.args) >= index else ""

    def env(self, key: str) -> str:
        value = self.session.env.get(key, "")
        return "" if value == "unknown" else value

    def publish(self, outcome: "Outcome") -> None:
        """Set the contract's channel variables (safe on a dead channel)."""
        self.session.set_variable(V.STATUS, outcome.status)
        self.session.set_variable(V.CALL_ID, outcome.call_id or "")
        if outcome.responsible is not None:
            self.session.set_variable(V.RESPONSIBLE, outcome.responsible)


@dataclass
class Outcome:
    status: str = V.OK
    call_id: Optional[str] = None
    responsible: Optional[str] = None  # set only by `incoming`
    reason: str = ""
