"""Queuing a call's register, shared by `incoming`, `outgoing` and `dial`."""
from __future__ import annotations

import time
from typing import List

from agi_bitrix.bitrix import payloads
from agi_bitrix.controllers.base import EventContext

TYPES = {"incoming": payloads.CallType.INCOMING, "outgoing": payloads.CallType.OUTGOING}


def register_call(ctx: EventContext, direction: str, user: str, phone: str, line: str) -> List[int]:
    """Record the call and journal its register, for employee `user`; the entries journaled.

    A linkedid seen before (another leg ran the same event) queues nothing new. The payload is
    fixed now, so a replay hours later carries the real start time and the same dedup key
    (EXTERNAL_CALL_ID = linkedid): Bitrix24 answers a repeat with the same CALL_ID.
    """
    calls = ctx.settings.calls
    payload = payloads.register(
        USER_PHONE_INNER=user, PHONE_NUMBER=phone, TYPE=TYPES[direction],
        CALL_START_DATE=payloads.iso(time.time()),
        CRM_CREATE=int(calls.crm_create and phone != calls.anonymous_number),  # no lead for "nobody"
        LINE_NUMBER=line or None, EXTERNAL_CALL_ID=ctx.linkedid, SHOW=1)
    ctx.log.update(phone=phone, user=user, line=line)
    entry = ctx.store.start_call(ctx.linkedid, direction, phone, line, user, payload,
                                 ctx.outbox.owner, ctx.lease)
    return [] if entry is None else [entry]
