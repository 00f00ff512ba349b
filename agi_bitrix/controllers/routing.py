"""Who gets an incoming call: the client's responsible manager when he has an inner number."""
from __future__ import annotations

from typing import Optional

from agi_bitrix import phones
from agi_bitrix.bitrix import payloads
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.controllers.base import EventContext


def responsible_for(ctx: EventContext, phone: str) -> Optional[str]:
    """Inner number of the CRM client's responsible manager, or None (use the default route).

    A lookup failure never blocks the call: the default employee gets it.
    """
    if not any(ch.isdigit() for ch in phone) or phone == ctx.settings.calls.anonymous_number:
        return None
    try:
        found = ctx.bitrix.call(payloads.SEARCH_CRM, {"PHONE_NUMBER": phone}, ctx.deadline)
    except BitrixError as exc:
        ctx.log["routing_error"] = exc.summary()
        return None
    for entity in found if isinstance(found, list) else []:
        manager = entity.get("ASSIGNED_BY") if isinstance(entity, dict) else None
        inner = phones.inner_number(str((manager or {}).get("USER_PHONE_INNER") or ""))
        if inner:
            ctx.log["crm_entity"] = f"{entity.get('CRM_ENTITY_TYPE')}_{entity.get('CRM_ENTITY_ID')}"
            return inner
    return None
