"""`incoming` CALLER DID: register an incoming call and pop the card for the chosen employee."""
from __future__ import annotations

from agi_bitrix import phones
from agi_bitrix.controllers.base import EventContext, Outcome, Refused
from agi_bitrix.controllers.register import register_call
from agi_bitrix.controllers.routing import responsible_for


def handle(ctx: EventContext) -> Outcome:
    calls = ctx.settings.calls
    phone, why = phones.caller_number(ctx.arg(1) or ctx.env("agi_callerid"), calls.region,
                                      calls.anonymous_number)
    if why:
        ctx.log["caller_note"] = why
    did = ctx.arg(2) or ctx.env("agi_dnid") or ctx.env("agi_extension")
    # The DID names the external line unless one fixed line is configured.
    line = calls.line_number or phones.caller_number(did, calls.region, "")[0]
    responsible = responsible_for(ctx, phone) if calls.route_to_responsible else None
    user = responsible or calls.default_user
    if not user:
        raise Refused("no employee to show the call to: set [calls] default_user")
    queued = register_call(ctx, "incoming", user, phone, line)
    # A ring group or queue: the card pops up for every phone that rings (one batched show).
    # The dialplan names them in BITRIX_RING (e.g. ${INBOUND_PHONES} or ${QUEUE_MEMBER_LIST(q)}).
    others = [] if responsible else [u for u in phones.ringing(ctx.session.get_variable("BITRIX_RING")) if u != user]
    if others and queued:
        ctx.log["ringing"] = others
        queued.append(ctx.store.move_card(ctx.linkedid, others, [], [user] + others, ctx.outbox.owner, ctx.lease))
    return Outcome(responsible=responsible or "", queued=queued)
