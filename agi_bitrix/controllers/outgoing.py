"""`outgoing` EXT NUMBER: register an employee's outgoing call."""
from __future__ import annotations

from agi_bitrix import phones
from agi_bitrix.controllers.base import EventContext, Outcome, Refused
from agi_bitrix.controllers.register import register_call


def handle(ctx: EventContext) -> Outcome:
    calls = ctx.settings.calls
    raw_ext = ctx.arg(1) or ctx.env("agi_callerid")
    ext = phones.inner_number(raw_ext)
    if not ext:
        raise Refused(f"caller {raw_ext[:40]!r} is not an inner number")
    number, why = phones.caller_number(ctx.arg(2) or ctx.env("agi_extension"), calls.region, "")
    if not number:
        raise Refused(f"dialed number refused: {why or 'empty'}")
    return Outcome(queued=register_call(ctx, "outgoing", ext, number, calls.line_number))
