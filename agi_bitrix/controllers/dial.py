"""`dial` NUMBER [EXT]: validate the number, register the call for EXT, and Dial it.

The Dial itself is run by the dispatcher once the step's status is on the channel: Dial blocks
until the call ends, and the hangup handler needs BITRIX_CALL_ID before that.
"""
from __future__ import annotations

from agi_bitrix import phones
from agi_bitrix.agi import variables as V
from agi_bitrix.controllers.base import EventContext, Outcome, Refused
from agi_bitrix.controllers.register import register_call


def handle(ctx: EventContext) -> Outcome:
    ast, calls = ctx.settings.asterisk, ctx.settings.calls
    raw = ctx.arg(1)
    try:
        e164 = phones.dialable(raw, calls.region, "e164")
        trunk_number = phones.dialable(raw, calls.region, ast.number_format)
        target = phones.dial_string(ast.dial_template, trunk_number)
    except phones.InvalidNumber as exc:
        raise Refused(f"not dialing {raw[:40]!r}: {exc}") from None
    ctx.log.update(number=e164, dial=target)
    outcome = Outcome(dial=f"{target},{ast.dial_timeout}" + (f",{ast.dial_options}" if ast.dial_options else ""))
    raw_ext = ctx.arg(2)
    if raw_ext and not phones.inner_number(raw_ext):
        # The caller still gets his call; only the CRM record is missing.
        outcome.status, outcome.reason = V.ERROR, f"EXT {raw_ext[:40]!r} is not an inner number; call not registered"
    elif raw_ext:
        outcome.queued = register_call(ctx, "outgoing", raw_ext, e164, calls.line_number)
    return outcome
