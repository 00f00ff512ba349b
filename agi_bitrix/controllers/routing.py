"""Who gets an incoming call: the client's responsible manager when he has an inner number.

The lookup sits on the ring path, so it has its own short budget (`[calls] route_timeout`) and
its answers are cached per number (`[calls] route_cache`); a lookup that fails or takes too long
falls back to the default route and is not cached.
"""
from __future__ import annotations

from typing import Any, Optional

from agi_bitrix import phones
from agi_bitrix.bitrix import payloads
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.controllers.base import EventContext
from agi_bitrix.deadline import Deadline

WORKDAY_OPEN = {"OPENED"}
# Time tracking off or not installed: nothing says the manager is away.
WORKDAY_UNKNOWN = {"UNAVAILABLE", "NOT_INSTALLED", "", None}


def _manager(entity: Any, only_workday: bool) -> Optional[str]:
    manager = entity.get("ASSIGNED_BY") if isinstance(entity, dict) else None
    if not isinstance(manager, dict):
        return None
    inner = phones.inner_number(str(manager.get("USER_PHONE_INNER") or ""))
    if inner and only_workday and manager.get("TIMEMAN_STATUS") not in WORKDAY_OPEN | WORKDAY_UNKNOWN:
        return None
    return inner


def responsible_for(ctx: EventContext, phone: str) -> Optional[str]:
    """Inner number of the CRM client's responsible manager, or None (use the default route)."""
    calls = ctx.settings.calls
    if not any(ch.isdigit() for ch in phone) or phone == calls.anonymous_number:
        return None
    cached = ctx.store.route(phone, calls.route_cache) if calls.route_cache else None
    if cached is not None:
        ctx.log["route"] = "cached"
        return cached or None
    budget = Deadline(min(calls.route_timeout, ctx.deadline.remaining()))
    try:
        found = ctx.bitrix.call(payloads.SEARCH_CRM, {"PHONE_NUMBER": phone}, budget)
    except BitrixError as exc:
        ctx.log["routing_error"] = exc.summary()
        return None
    inner = ""
    for entity in found if isinstance(found, list) else []:
        candidate = _manager(entity, calls.route_only_workday)
        if candidate:
            ctx.log["crm_entity"] = f"{entity.get('CRM_ENTITY_TYPE')}_{entity.get('CRM_ENTITY_ID')}"
            inner = candidate
            break
    if calls.route_cache:
        ctx.store.remember_route(phone, inner)
    return inner or None
