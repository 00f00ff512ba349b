"""Phone numbers: normalization for Bitrix24 and the one validator that lets a number into a dial string.

phonenumbers is imported where a number is parsed, not with this module: the steps that only
read inner numbers and channels (`answer`, `hangup`) would pay a tenth of their CPU for it.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    import phonenumbers

ANONYMOUS_IDS = {"", "anonymous", "unknown", "restricted", "private", "unavailable", "withheld", "asterisk"}
# What a human-written phone number may contain: digits, one leading +, and separators.
_PHONE_CHARS = re.compile(r"\+?[0-9()\-. ]+")
_DIALABLE = re.compile(r"\+?[0-9]{3,20}")
_INNER = re.compile(r"[0-9]{1,15}")
MAX_RAW = 64


class InvalidNumber(ValueError):
    """A number that must not be used; the message says why, for the log."""


def _digits(raw: str) -> str:
    return re.sub(r"[^0-9]", "", raw)


def _parse(raw: str, region: str) -> Optional[phonenumbers.PhoneNumber]:
    """Best reading of a number: as dialed in `region`, then as international without '+'."""
    import phonenumbers

    def read(text: str) -> Optional[phonenumbers.PhoneNumber]:
        try:
            return phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            return None

    first = read(raw)
    if first is not None and phonenumbers.is_valid_number(first):
        return first  # nothing the second reading could change: it is only tried after this one
    second = None if raw.startswith("+") else read("+" + _digits(raw))
    if second is not None and phonenumbers.is_valid_number(second):
        return second
    for number in (first, second):
        if number is not None and phonenumbers.is_possible_number(number):
            return number
    return None


def _check_shape(raw: str) -> str:
    text = raw.strip()
    if len(text) > MAX_RAW:
        raise InvalidNumber(f"number is {len(text)} characters long")
    if not _PHONE_CHARS.fullmatch(text):
        bad = next((c for c in text if not (c.isdigit() or c in "+()-. ")), "+")
        raise InvalidNumber(f"number contains {bad!r}")
    return text


# `agi-bitrix service` meets the same numbers again and again (a line's DID on each of its calls,
# a caller's number at each of his steps): parsing one costs phonenumbers a fifth of a step.
@lru_cache(maxsize=4096)
def caller_number(raw: Optional[str], region: str, anonymous: str) -> Tuple[str, Optional[str]]:
    """The number to register for a caller ID, and the reason when it was replaced.

    Internal extensions (up to 6 digits) stay as they are; anything that reads as a phone number
    becomes E.164; hidden or hostile caller IDs become `anonymous`.
    """
    text = (raw or "").strip()
    if text.lower() in ANONYMOUS_IDS:
        return anonymous, None
    try:
        text = _check_shape(text)
    except InvalidNumber as exc:
        return anonymous, f"caller ID refused: {exc}"
    digits = _digits(text)
    if not digits:
        return anonymous, "caller ID has no digits"
    if len(digits) <= 6:
        return digits, None
    number = _parse(text, region)
    if number is None:
        return ("+" if text.startswith("+") else "") + digits, None
    import phonenumbers

    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


def dialable(raw: Optional[str], region: str, fmt: str = "e164") -> str:
    """Validate an untrusted number for dialing out; return it in the trunk's format or raise."""
    import phonenumbers
    from phonenumbers import PhoneNumberFormat

    text = _check_shape(raw or "")
    if not _digits(text):
        raise InvalidNumber("number is empty")
    number = _parse(text, region)
    if number is None or not phonenumbers.is_valid_number(number):
        raise InvalidNumber(f"not a valid phone number (region {region})")
    if fmt == "national":
        out = _digits(phonenumbers.format_out_of_country_calling_number(number, region))
    elif fmt == "e164_digits":
        out = _digits(phonenumbers.format_number(number, PhoneNumberFormat.E164))
    else:
        out = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    if not _DIALABLE.fullmatch(out):  # the last gate before a dial string
        raise InvalidNumber("number does not format to digits")
    return out


def dial_string(template: str, number: str) -> str:
    """Fill `[asterisk] dial_template`; only a validated number may enter."""
    if not _DIALABLE.fullmatch(number):
        raise InvalidNumber("refusing to dial an unvalidated number")
    return template.replace("{number}", number)


def inner_number(raw: Optional[str]) -> Optional[str]:
    """An employee's inner (extension) number, or None when `raw` is not one."""
    text = (raw or "").strip()
    return text if _INNER.fullmatch(text) else None


def extension_from_channel(channel: Optional[str]) -> Optional[str]:
    """`PJSIP/102-0000001a` -> 102, `Local/101@operators-00000022;1` -> 101, trunks -> None."""
    match = re.match(r"^[A-Za-z0-9_]+/([^@/;\-]+)", channel or "")
    return inner_number(match.group(1)) if match else None


def ringing(text: Optional[str]) -> list:
    """Inner numbers named by a ring list: `PJSIP/101&PJSIP/102`, `101,102`, `Local/103@queue/n`."""
    found = []
    for piece in re.split(r"[&,\s]+", text or ""):
        inner = inner_number(piece) or extension_from_channel(piece)
        if inner and inner not in found:
            found.append(inner)
    return found[:50]
