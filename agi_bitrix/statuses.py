"""Asterisk DIALSTATUS (apps/app_dial.c) -> Bitrix24 STATUS_CODE (Bitrix24 REST docs:
telephony.externalcall.finish)."""
from __future__ import annotations

DIALSTATUS_CODES = {
    "ANSWER": "200",
    "NOANSWER": "304",
    "BUSY": "486",
    "CANCEL": "603-S",
    "CONGESTION": "503",
    "CHANUNAVAIL": "480",
}


def status_code(dialstatus: str, direction: str, answered: bool = False) -> str:
    """The finish STATUS_CODE of a call.

    Empty DIALSTATUS means no Dial ran: a missed call when incoming, a cancelled one when
    outgoing, unless agi-bitrix saw the answer itself (then the call was talked).
    """
    value = (dialstatus or "").strip().upper()
    if not value:
        if answered:
            return "200"
        return "304" if direction == "incoming" else "603-S"
    return DIALSTATUS_CODES.get(value, "OTHER")
