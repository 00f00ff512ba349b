"""`dialer-failed` REASON: the dialplan's `failed` extension of a dialer Originate.

It runs on a new `OutgoingSpoolFailed` channel (its own linkedid), so the attempt comes from the
DIALER_ATTEMPT variable the Originate set. REASON 5 busy, 3 no answer, 8 congestion, 0 failure.
"""
from __future__ import annotations

import re

from agi_bitrix.controllers.base import EventContext, Outcome, Refused
from agi_bitrix.dialer import outcomes, policy
from agi_bitrix.dialer.state import dialer_state


def handle(ctx: EventContext) -> Outcome:
    attempt_id = ctx.session.get_variable("DIALER_ATTEMPT") or ""
    if not re.fullmatch(r"dialer-[0-9]+-[0-9]+-[0-9a-f]{6}", attempt_id):
        raise Refused("DIALER_ATTEMPT is missing or malformed on this channel")
    raw = ctx.arg(1) or ctx.session.get_variable("REASON") or ""
    reason = int(raw) if raw.isdigit() else -1
    outcome = policy.REASONS.get(reason, "failed")
    ctx.log.update(attempt=attempt_id, reason=reason, outcome=outcome,
                   attempt_no=ctx.session.get_variable("AST_OUTGOING_ATTEMPT"))
    recorded = outcomes.record_outcome(ctx.store, dialer_state(ctx.store), ctx.settings, attempt_id, outcome,
                                       ctx.outbox.owner)
    if recorded is None:
        ctx.log["note"] = "outcome already recorded by the dialer"
        return Outcome()
    # This attempt's writes are delivered under its own key (its linkedid is not this channel's).
    return Outcome(queued=[e.id for e in ctx.store.entries(attempt_id, "pending")], deliver=[attempt_id])
