"""`answer` EXT: runs on the answering leg; the card and the call move to that employee."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from agi_bitrix import phones
from agi_bitrix.bitrix import payloads
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.controllers.base import EventContext, Outcome, Refused


def handle(ctx: EventContext) -> Outcome:
    raw = ctx.arg(1)
    ext = phones.inner_number(raw) if raw else phones.extension_from_channel(ctx.env("agi_channel"))
    if raw and not ext:
        ctx.log["ext_note"] = f"{raw[:40]!r} is not an inner number"
    before = ctx.store.mark_answered(ctx.linkedid, ext)
    if before is None:
        raise Refused("no call is known for this linkedid (did `incoming` or `outgoing` run?)")
    ctx.log.update(answered_by=ext, direction=before.direction)
    if before.answered_at is not None:
        ctx.log["note"] = f"already answered by {before.answered_inner}"
        return Outcome(call_id=before.call_id)
    # An outgoing call is answered by the client: only the talk time starts.
    if before.direction != "incoming" or not ext or before.shown == [ext]:
        return Outcome(call_id=before.call_id)
    if not before.call_id:
        raise Refused("the call was never registered, the card cannot move")
    move_card(ctx, before.call_id, ext, [u for u in before.shown if u != ext])
    ctx.store.set_shown(ctx.linkedid, [ext])
    return Outcome(call_id=before.call_id)


def move_card(ctx: EventContext, call_id: str, to: str, away_from: List[str]) -> None:
    """Show the card to `to` and hide it from `away_from`, in one batch request.

    Employees' user ids come from the local cache; unknown ones are looked up inside the same
    batch and referenced with `$result[...]`.
    """
    commands: Dict[str, Tuple[str, Dict[str, Any]]] = {}

    def user_ref(inner: str) -> Any:
        cached = ctx.store.user_id(inner)
        if cached is not None:
            return cached
        key = f"u{inner}"
        commands[key] = ("user.get", {"FILTER": {"UF_PHONE_INNER": inner, "ACTIVE": "true"}})
        return f"$result[{key}][0][ID]"

    show_to = user_ref(to)
    hide_from = [user_ref(inner) for inner in away_from]
    commands["show"] = (payloads.SHOW, {"CALL_ID": call_id, "USER_ID": show_to})
    if hide_from:
        commands["hide"] = (payloads.HIDE, {"CALL_ID": call_id, "USER_ID": hide_from})
    try:
        result = ctx.bitrix.batch(commands, deadline=ctx.deadline)
    except BitrixError as exc:
        raise Refused(f"card not moved to {to}: {exc.summary()}") from None
    for key, rows in result.results.items():
        if key.startswith("u") and isinstance(rows, list) and rows and isinstance(rows[0], dict):
            try:
                ctx.store.remember_user(key[1:], int(rows[0]["ID"]))
            except (KeyError, TypeError, ValueError):
                pass
    problems = [str(result.error(key)) for key in commands if result.error(key)]
    if problems:
        raise Refused(f"card not moved to {to}: {problems[0]}")
