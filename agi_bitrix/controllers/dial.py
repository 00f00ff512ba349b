"""`dial` NUMBER [EXT]: validate the number, register the call for EXT, and Dial it."""
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
    ctx.log["number"] = e164
    outcome = Outcome()
    raw_ext = ctx.arg(2)
    if raw_ext and not phones.inner_number(raw_ext):
        # The caller still gets his call; only the CRM record is missing.
        outcome.status, outcome.reason = V.ERROR, f"EXT {raw_ext[:40]!r} is not an inner number; call not registered"
    elif raw_ext:
        register_call(ctx, "outgoing", raw_ext, e164, calls.line_number)
        outcome = ctx.settle(outcome)
    ctx.publish(outcome)  # before Dial: it blocks until the call ends
    options = f"{target},{ast.dial_timeout}" + (f",{ast.dial_options}" if ast.dial_options else "")
    result = ctx.session.exec_app("Dial", options)
    ctx.log.update(dial=target, dial_result=result, dialstatus=ctx.session.get_variable("DIALSTATUS"))
    return outcome
