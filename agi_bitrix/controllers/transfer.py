"""`transfer` TARGET: the call moves on (Asterisk's blind or attended transfer).

Sets BITRIX_DIAL to what the dialplan dials: an employee's phone ([asterisk] phone_channel) for an
inner number (up to 6 digits), the trunk ([asterisk] dial_template) for a valid outside number.
The first employee's part is finished with its own talk time. An employee target gets a part of
his own: a new CALL_ID (EXTERNAL_CALL_ID = linkedid-t<n>), bound to the same client, his card
popping up; later `answer` and `hangup` steps of the call apply to the newest part, so the second
half of a transferred call is never missing. An outside target gets no part: nobody of the
company talks in it.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

from agi_bitrix import phones
from agi_bitrix.bitrix import payloads
from agi_bitrix.controllers.base import EventContext, Outcome, Refused
from agi_bitrix.controllers.hangup import queue_part_finish, read_answeredtime
from agi_bitrix.controllers.register import TYPES

INNER_MAX_DIGITS = 6  # as for caller IDs: up to 6 digits is an employee's inner number


def _target(ctx: EventContext, raw: str) -> Tuple[Optional[str], str]:
    """(inner number or None for an external number, dial string); Refused when neither."""
    if not re.fullmatch(r"\+?[0-9]{1,20}", raw):
        raise Refused(f"transfer target {raw[:40]!r} is not a number; nothing dialed")
    digits = raw.lstrip("+")
    ast = ctx.settings.asterisk
    if len(digits) <= INNER_MAX_DIGITS and not raw.startswith("+"):
        return digits, ast.phone_channel.replace("{inner}", digits)
    try:
        number = phones.dialable(raw, ctx.settings.calls.region, ast.number_format)
        return None, phones.dial_string(ast.dial_template, number)
    except phones.InvalidNumber as exc:
        raise Refused(f"transfer target {raw[:40]!r}: {exc}; nothing dialed") from None


def handle(ctx: EventContext) -> Outcome:
    try:
        target, dial = _target(ctx, ctx.arg(1))
    except Refused as exc:
        raise Refused(str(exc), variables={"BITRIX_DIAL": ""}) from None  # nothing to dial
    # The transfer goes on in Asterisk whatever Bitrix24 knows of the call.
    variables = {"BITRIX_DIAL": dial}
    ctx.log.update(transfer_to=target or "external", dial=dial)
    key = ctx.store.active_key(ctx.linkedid)
    call = ctx.store.call(key)
    if call is None:
        raise Refused("no call is known for this linkedid (did `incoming` or `outgoing` run?); "
                      "the transfer is dialed, Bitrix24 is not told", variables=variables)
    ctx.log["part"] = key
    holder = call.answered_inner if call.answered_at else call.user_inner
    if target == holder:
        ctx.log["note"] = "transfer to the employee who already has the call"
        return Outcome(variables=variables)
    # The first part ends now, answered (talked) or not (e.g. an operator passing the call on).
    # A blind transfer runs this on the transferee, whose Dial just ended: its ANSWEREDTIME is
    # the first part's talk time (Asterisk main/bridge_basic.c, apps/app_dial.c).
    answeredtime = read_answeredtime(ctx, None) if call.answered_at else None
    queued = queue_part_finish(ctx, key, call, "ANSWER" if call.answered_at else "", answeredtime)
    if target is None:
        # An outside number takes the call over: the employee's part is all Bitrix24 records.
        ctx.log["note"] = "transferred to an external number: the call ends in Bitrix24 with this part"
        return Outcome(queued=queued, deliver=[key], variables=variables)
    new_key = f"{ctx.linkedid}-t{_next_part(ctx)}"
    register = payloads.register(
        USER_PHONE_INNER=target, PHONE_NUMBER=call.phone, TYPE=TYPES[call.direction],
        CALL_START_DATE=payloads.iso(ctx.clock()), CRM_CREATE=0, LINE_NUMBER=call.line or None,
        EXTERNAL_CALL_ID=new_key, SHOW=1)
    register["_bind_from"] = key  # filled with the first part's client when delivered
    entry = ctx.store.start_part(ctx.linkedid, new_key, call.direction, call.phone, call.line, target, register,
                                 ctx.outbox.owner, ctx.lease)
    if entry is not None:
        queued.append(entry)
    ctx.log["new_part"] = new_key
    return Outcome(queued=queued, deliver=[key, new_key], variables=variables)


def _next_part(ctx: EventContext) -> int:
    n = 2
    while ctx.store.call(f"{ctx.linkedid}-t{n}") is not None:
        n += 1
    return n
