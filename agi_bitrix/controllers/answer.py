"""`answer` EXT: runs on the answering leg; the card and the call move to that employee.

It runs in Dial's U() gosub (or Queue's gosub), before the bridge: the client hears nothing until
it returns. So it only journals the card move and gives Asterisk its status (QUEUED when a move
waits, OK when there is none); a child process delivers the move after the step has returned.
"""
from __future__ import annotations

from agi_bitrix import phones
from agi_bitrix.controllers.base import EventContext, Outcome, Refused

DELIVER_AFTER_RETURN = True  # the dispatcher answers Asterisk before any request


def handle(ctx: EventContext) -> Outcome:
    raw = ctx.arg(1)
    ext = phones.inner_number(raw) if raw else phones.extension_from_channel(ctx.env("agi_channel"))
    if raw and not ext:
        ctx.log["ext_note"] = f"{raw[:40]!r} is not an inner number"
    key = ctx.store.active_key(ctx.linkedid)  # after a transfer, the part now going on
    before = ctx.store.mark_answered(key, ext, ctx.clock())
    if before is None:
        raise Refused("no call is known for this linkedid (did `incoming` or `outgoing` run?)")
    ctx.log.update(answered_by=ext, direction=before.direction)
    if before.answered_at is not None:
        ctx.log["note"] = f"already answered by {before.answered_inner}"
        return Outcome()
    # An outgoing call is answered by the client: only the talk time starts.
    if before.direction == "incoming" and ext and before.shown != [ext]:
        # The card moves to whoever answered: shown to him (unless it is up already), hidden from the rest.
        show = [] if ext in before.shown else [ext]
        hide = [u for u in before.shown if u != ext]
        return Outcome(queued=[ctx.store.move_card(key, show, hide, [ext], ctx.outbox.owner, ctx.lease)],
                       deliver=[key])
    return Outcome()
