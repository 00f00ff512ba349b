"""`click-answered`: the employee picked up a click-to-call or callback-form call; dial the client.

Runs in [bitrix-click2call] on the employee's channel (its linkedid is the call's key). Sets
BITRIX_DIAL to the trunk dial string of the validated number; the hangup step finishes the
CALL_ID Bitrix24 gave (click-to-call) or the one this call registered (callback form).
"""
from __future__ import annotations

from agi_bitrix import phones
from agi_bitrix.controllers.base import EventContext, Outcome, Refused


def handle(ctx: EventContext) -> Outcome:
    call = ctx.store.call(ctx.linkedid)
    if call is None:
        raise Refused("not a click-to-call or callback call (unknown linkedid)")
    ast = ctx.settings.asterisk
    try:
        target = phones.dial_string(ast.dial_template,
                                    phones.dialable(call.phone, ctx.settings.calls.region, ast.number_format))
    except phones.InvalidNumber as exc:
        raise Refused(f"not dialing the client: {exc}") from None
    ctx.log.update(dial=target, user=call.user_inner)
    return Outcome(variables={"BITRIX_DIAL": target, "BITRIX_DIAL_TIMEOUT": str(ast.dial_timeout)})
