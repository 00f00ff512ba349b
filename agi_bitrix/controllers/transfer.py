"""`transfer` EXT: the call moves to another employee (Asterisk's blind or attended transfer).

The first employee's part is finished with its own talk time; the transfer target gets a part of
his own: a new CALL_ID (EXTERNAL_CALL_ID = linkedid-t<n>), bound to the same client, his card
popping up. Later `answer` and `hangup` steps of the call apply to the newest part, so the second
half of a transferred call is never missing.
"""
from __future__ import annotations

import time

from agi_bitrix import phones
from agi_bitrix.bitrix import payloads
from agi_bitrix.controllers.base import EventContext, Outcome, Refused
from agi_bitrix.controllers.hangup import queue_part_finish
from agi_bitrix.controllers.register import TYPES


def handle(ctx: EventContext) -> Outcome:
    target = phones.inner_number(ctx.arg(1))
    if not target:
        raise Refused(f"transfer target {ctx.arg(1)[:40]!r} is not an inner number")
    key = ctx.store.active_key(ctx.linkedid)
    call = ctx.store.call(key)
    if call is None:
        raise Refused("no call is known for this linkedid (did `incoming` or `outgoing` run?)")
    ctx.log.update(transfer_to=target, part=key)
    holder = call.answered_inner if call.answered_at else call.user_inner
    if target == holder:
        ctx.log["note"] = "transfer to the employee who already has the call"
        return Outcome()
    # The first part ends now, answered (talked) or not (e.g. an operator passing the call on).
    queue_part_finish(ctx, key, call, "ANSWER" if call.answered_at else "")
    new_key = f"{ctx.linkedid}-t{_next_part(ctx)}"
    register = payloads.Register(
        USER_PHONE_INNER=target, PHONE_NUMBER=call.phone, TYPE=TYPES[call.direction],
        CALL_START_DATE=payloads.iso(time.time()), CRM_CREATE=0, LINE_NUMBER=call.line or None,
        EXTERNAL_CALL_ID=new_key, SHOW=1).params()
    register["_bind_from"] = key  # filled with the first part's client when delivered
    entry = ctx.store.start_part(ctx.linkedid, new_key, call.direction, call.phone, call.line, target, register,
                                 ctx.outbox.owner, ctx.lease)
    if entry is not None:
        ctx.queued.append(entry)
    ctx.keys = [key, new_key]
    ctx.log["new_part"] = new_key
    return Outcome()


def _next_part(ctx: EventContext) -> int:
    n = 2
    while ctx.store.call(f"{ctx.linkedid}-t{n}") is not None:
        n += 1
    return n
