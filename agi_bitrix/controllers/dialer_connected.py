"""`dialer-connected`: the second party answered (Dial U() gosub): talk time starts.

Like `answer` it runs before the bridge, so whatever it leaves for Bitrix24 is delivered after
the step has returned.
"""
from __future__ import annotations

from agi_bitrix.controllers.base import EventContext, Outcome, Refused
from agi_bitrix.dialer.state import dialer_state

DELIVER_AFTER_RETURN = True


def handle(ctx: EventContext) -> Outcome:
    dstate = dialer_state(ctx.store)
    attempt = dstate.attempt(ctx.linkedid)
    if attempt is None:
        raise Refused("not a dialer call (no attempt with this linkedid)")
    dstate.set_attempt_state(attempt.attempt_id, "connected")
    ctx.store.mark_answered(ctx.linkedid, attempt.operator, ctx.clock())
    ctx.log.update(task=attempt.task_id, operator=attempt.operator)
    return Outcome()
