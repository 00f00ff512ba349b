"""Binding the widgets to the portal (after `auth` and on the install callback) and reading back
where they point (for `check`).

Bitrix24 REST docs, api-reference/widgets/placement-bind.md, placement-unbind.md, placement-get.md:
binding needs the application's context and an administrator; PAGE_BACKGROUND_WORKER takes one
general handler (a second bind answers ERROR_PLACEMENT_MAX_COUNT) and needs
OPTIONS[errorHandlerUrl]; unbinding a placement without HANDLER removes all of the application's
handlers there. So a re-bind first unbinds, and a changed public address simply replaces the old.
"""
from __future__ import annotations

from typing import Any, Dict, List

from agi_bitrix.settings import Settings

WORKER = "PAGE_BACKGROUND_WORKER"
CARD = "CALL_CARD"
TAB_TITLES = {"ru": "Клиент и задача", "en": "Client and task"}


def handler_urls(settings: Settings) -> Dict[str, str]:
    base = settings.placements.public_url
    if not base:
        return {}
    return {WORKER: base + "placement/worker", CARD: base + "placement/card", "error": base + "placement/error"}


def bind_placements(client: Any, settings: Settings) -> List[str]:
    """(Re)bind both widgets to `[placements] public_url`; returns the placements bound."""
    urls = handler_urls(settings)
    if not urls:
        return []
    plans = [
        {"PLACEMENT": WORKER, "HANDLER": urls[WORKER], "TITLE": "agi-bitrix",
         "OPTIONS": {"errorHandlerUrl": urls["error"]}},
        {"PLACEMENT": CARD, "HANDLER": urls[CARD], "TITLE": TAB_TITLES["ru"],
         "LANG_ALL": {lang: {"TITLE": title} for lang, title in TAB_TITLES.items()}},
    ]
    for params in plans:
        client.call("placement.unbind", {"PLACEMENT": params["PLACEMENT"]})
        client.call("placement.bind", params)
    return [WORKER, CARD]


def bind_summary(client: Any, settings: Settings) -> str:
    """Bind, and say what happened in a few words: a failure must not undo an install or an auth."""
    try:
        return ", ".join(bind_placements(client, settings)) or "off"
    except Exception as exc:
        return f"not bound: {exc}"


def bound(client: Any) -> Dict[str, List[str]]:
    """Placement code -> the handler URLs the portal has for this application."""
    found: Dict[str, List[str]] = {}
    for row in client.call("placement.get") or []:
        if isinstance(row, dict):
            found.setdefault(str(row.get("placement") or ""), []).append(str(row.get("handler") or ""))
    return found


def report_widgets(report: Any, client: Any, settings: Settings, scopes: Any) -> None:
    """`check`: are the widgets bound, and to this server's public address?"""
    from agi_bitrix.bitrix.errors import BitrixError

    urls = handler_urls(settings)
    if not urls:
        report.ok("widgets", "off ([placements] public_url is empty): dialer calls are marked on the phone only")
        return
    if settings.bitrix24.mode != "oauth":
        report.problem("widgets", "[placements] needs the local application (OAuth mode); a webhook cannot bind "
                                  "widgets")
        return
    if "placement" not in set(scopes or ()):
        report.problem("widgets", "the application lacks the scope placement: tick it in the local application's "
                                  "settings in Bitrix24, save, and run agi-bitrix auth --code again")
        return
    try:
        have = bound(client)
    except BitrixError as exc:
        report.problem("widgets", "cannot read the bound widgets: {reason}", reason=exc.summary())
        return
    for code in (WORKER, CARD):
        handlers = have.get(code) or []
        if urls[code] in handlers:
            report.ok("widgets", "{code} bound to {url}", code=code, url=urls[code])
        elif handlers:
            report.problem("widgets", "{code} points to {handlers}, not {url}: run agi-bitrix auth --code again "
                                      "(or reinstall the application) to bind it anew",
                           code=code, handlers=", ".join(handlers), url=urls[code])
        else:
            report.problem("widgets", "{code} is not bound: run agi-bitrix auth --code again (or reinstall the "
                                      "application) to bind it", code=code)
