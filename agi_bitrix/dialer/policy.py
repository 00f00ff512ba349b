"""When a client may be called: calling hours in his local time, and the do-not-call list."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Set
from zoneinfo import ZoneInfo

import phonenumbers
from phonenumbers import timezone as number_timezone

from agi_bitrix import phones

if TYPE_CHECKING:
    from agi_bitrix.settings import DialerSettings


def client_zone(e164: str, default: str) -> ZoneInfo:
    """The client's time zone from his number; the default when the number spans several zones
    (a Russian mobile may be anywhere from Kaliningrad to Kamchatka)."""
    try:
        zones = [z for z in number_timezone.time_zones_for_number(phonenumbers.parse(e164)) if z != "Etc/Unknown"]
    except phonenumbers.NumberParseException:
        zones = []
    return ZoneInfo(zones[0] if len(zones) == 1 else default)


def within_hours(e164: str, settings: DialerSettings, now: Optional[datetime] = None) -> bool:
    local = (now or datetime.now().astimezone()).astimezone(client_zone(e164, settings.default_timezone))
    window = settings.hours_weekend if local.weekday() >= 5 else settings.hours
    if not window:
        return False
    start, end = window.split("-")
    return start <= local.strftime("%H:%M") < end


def load_dnc(path: str, region: str) -> Set[str]:
    """Numbers (E.164) nobody may dial: one per line, '#' comments; unreadable numbers are ignored."""
    if not path:
        return set()
    numbers = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                numbers.add(phones.dialable(text, region, "e164"))
            except phones.InvalidNumber:
                continue
    return numbers


def flagged_dnc(fields: dict, field_name: str) -> bool:
    """A CRM item whose do-not-call field is set (Y, 1, true, yes)."""
    if not field_name:
        return False
    value = fields.get(field_name)
    if isinstance(value, list):
        value = value[0] if value else ""
    return str(value).strip().lower() in {"y", "1", "true", "yes", "да"}


def retry_after(outcome: str, settings: DialerSettings) -> float:
    return {"busy": settings.retry_busy, "noanswer": settings.retry_noanswer,
            "unreachable": settings.retry_unreachable}.get(outcome, settings.retry_ours)


# Originate Reason (Asterisk main/pbx.c) -> outcome; congestion and our own failures are not the client's.
REASONS = {4: "answered", 5: "busy", 3: "noanswer", 0: "unreachable", 8: "congestion", 1: "failed"}
COUNTED = {"busy", "noanswer", "unreachable"}
STATUS_CODES = {"busy": "486", "noanswer": "304", "unreachable": "480", "congestion": "503", "failed": "OTHER",
                "nooperator": "304", "connected": "200"}
