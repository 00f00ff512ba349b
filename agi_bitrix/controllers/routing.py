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
    # One request: the client's entities, and whether the first one's manager is an active user
    # (a fired manager keeps his clients and his inner number until someone reassigns them).
    commands = {"s": (payloads.SEARCH_CRM, {"PHONE_NUMBER": phone}),
                "u": ("user.get", {"FILTER": {"ID": "$result[s][0][ASSIGNED_BY_ID]", "ACTIVE": "true"}})}
    try:
        result = ctx.bitrix.batch(commands, deadline=budget)
    except BitrixError as exc:
        ctx.log["routing_error"] = exc.summary()
        return None
    found = result.results.get("s")
    active = result.results.get("u")
    inner = ""
    entities = found if isinstance(found, list) else []
    if entities and isinstance(active, list) and active:
        candidate = _manager(entities[0], calls.route_only_workday)
        if candidate:
            ctx.log["crm_entity"] = f"{entities[0].get('CRM_ENTITY_TYPE')}_{entities[0].get('CRM_ENTITY_ID')}"
            inner = candidate
    elif entities:
        ctx.log["route_note"] = "the client's manager is not an active employee"
    if calls.route_cache:
        ctx.store.remember_route(phone, inner)
    return inner or None
