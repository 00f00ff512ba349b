"""`dialer-answered`: the first party of a dialer call answered; tell the dialplan whom to connect.

client_first: the client picked up; the operator's phone rings next, showing the dialer's mark and
the client's name, and his Bitrix24 card pops up bound to the task's client with a notification.
operator_first: the operator picked up; the client is dialed next.
"""
from __future__ import annotations

from agi_bitrix import phones
from agi_bitrix.controllers.base import EventContext, Outcome, Refused
from agi_bitrix.dialer import outcomes
from agi_bitrix.dialer.engine import caller_name
from agi_bitrix.dialer.state import dialer_state
from agi_bitrix.dialer.texts import text


def handle(ctx: EventContext) -> Outcome:
    dstate = dialer_state(ctx.store)
    attempt = dstate.attempt(ctx.linkedid)
    if attempt is None:
        raise Refused("not a dialer call (no attempt with this linkedid)")
    d, info = ctx.settings.dialer, attempt.info
    ctx.log.update(task=attempt.task_id, operator=attempt.operator, mode=attempt.mode)
    variables = {}
    if attempt.mode == "client_first":
        target = d.operator_channel.replace("{inner}", phones.inner_number(attempt.operator) or "")
        variables["DIALER_CALLERID_NAME"] = caller_name(info.get("client", ""), d.caller_prefix)
        variables["DIALER_CALLERID_NUM"] = attempt.phone
    else:
        number = phones.dialable(attempt.phone, ctx.settings.calls.region, ctx.settings.asterisk.number_format)
        target = phones.dial_string(ctx.settings.asterisk.dial_template, number)
    variables.update(DIALER_DIAL=target, DIALER_RING=str(d.ring_timeout))
    dstate.set_attempt_state(attempt.attempt_id, "answered")
    queued = []
    if ctx.store.call(ctx.linkedid) is None:
        outcomes.register_attempt(ctx.store, ctx.settings, attempt, show=True, owner=ctx.outbox.owner)
        queued = [e.id for e in ctx.store.entries(ctx.linkedid, "pending")]
    url = outcomes.task_url(ctx.settings, attempt.task_id, int(info.get("responsible_id") or 0))
    message = text(d.language, "notify", client=info.get("client", ""), phone=attempt.phone, url=url,
                   title=info.get("title", ""))
    notify = {"USER_ID": int(info.get("operator_id") or 0), "MESSAGE": message,
              "TAG": f"agi-bitrix-dialer-{attempt.task_id}", "CLIENT_ID": "agi-bitrix"}
    queued += ctx.store.queue_rest(ctx.linkedid, [("im.notify", notify)], ctx.outbox.owner, ctx.lease)
    return Outcome(queued=queued, variables=variables)
