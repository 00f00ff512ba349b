"""The widgets' HTTP side, independent of the server hosting it (`serve` today, the service later).

Bitrix24 opens a placement frame with a POST (Bitrix24 REST docs: api-reference/widgets/index.md,
_includes/widget_data.md) and removes a PAGE_BACKGROUND_WORKER whose handler loads longer than 5 s
too often (widgets/universal/background-worker.md), so every answer here is bounded by
`[placements] timeout`: when the portal does not confirm the operator in time the worker page
stays inert and the tab says so; nothing becomes an error page.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional
from urllib.parse import parse_qs, urlsplit

from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.deadline import Deadline
from agi_bitrix.dialer.outcomes import task_url
from agi_bitrix.placements import lookup
from agi_bitrix.placements.identity import Operator, Refused, Unavailable, Verifier, within
from agi_bitrix.placements.pages import csp, render
from agi_bitrix.placements.texts import language, plain, words
from agi_bitrix.settings import Settings
from agi_bitrix.stores import open_store

PREFIX = "/placement/"
MAX_BODY = 64 * 1024


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: Dict[str, str] = field(default_factory=dict)


def _json(status: int, data: Dict[str, Any]) -> Response:
    return Response(status, json.dumps(data, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")


class PlacementApp:
    def __init__(self, settings: Settings, logger: Any, verifier: Optional[Verifier] = None) -> None:
        self.settings = settings
        self.logger = logger
        self.verifier = verifier or Verifier(settings)

    @staticmethod
    def serves(path: str) -> bool:
        return urlsplit(path).path.startswith(PREFIX)

    def handle(self, verb: str, path: str, form: Mapping[str, Any]) -> Response:
        parts = urlsplit(path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        route = parts.path[len(PREFIX):].strip("/")
        if verb != "POST":
            return Response(405, b"widgets are opened by Bitrix24 with a POST\n", "text/plain; charset=utf-8",
                            {"Allow": "POST"})
        lang = language(form.get("LANG") or query.get("LANG"))
        started = time.monotonic()
        deadline = Deadline(self.settings.placements.timeout)
        log: Dict[str, Any] = {"widget": route[:20]}
        try:
            if route == "worker":
                return self._worker(form, lang, deadline, log)
            if route == "lookup":
                return self._lookup(form, lang, deadline, log)
            if route == "card":
                return self._card(form, lang, deadline, log)
            if route == "error":
                # Bitrix24 disabled the background worker (it POSTs without tokens): say so plainly.
                self.logger.error("widget_disabled", reason=str(form.get("error") or form.get("ERROR") or
                                                                 "ERROR_PLACEMENT_LOADING_OVERTIME")[:80],
                                  fix="run agi-bitrix auth --code again (or reinstall the application) to bind the widgets anew")
                return Response(200, b"ok\n", "text/plain; charset=utf-8")
            return Response(404, b"unknown widget\n", "text/plain; charset=utf-8")
        finally:
            log["ms"] = int((time.monotonic() - started) * 1000)
            self.logger.info("widget", **log)

    # -- identity ------------------------------------------------------------------------------
    def _who(self, form: Mapping[str, Any], deadline: Deadline, log: Dict[str, Any]) -> Operator:
        try:
            operator, _ = self.verifier.operator(form, deadline)
        except Refused as exc:
            log.update(outcome="refused", reason=str(exc))
            raise
        except Unavailable as exc:
            log.update(outcome="unavailable", reason=str(exc))
            raise
        log["user_id"] = operator.user_id
        return operator

    # -- PAGE_BACKGROUND_WORKER --------------------------------------------------------------------
    def _worker(self, form: Mapping[str, Any], lang: str, deadline: Deadline, log: Dict[str, Any]) -> Response:
        active, state = True, "loading"
        try:
            self._who(form, deadline, log)
        except Refused:
            return self._page("worker.html", lang, 403, state="refused", cfg={"active": False})
        except Unavailable:
            active, state = False, "unavailable"  # an inert page: no highlight, no error
        cfg = {"active": active, "auth": str(form.get("AUTH_ID") or ""), "member_id": str(form.get("member_id") or ""),
               "lang": lang, "lookup": "lookup", "wait_ms": int(self.settings.placements.timeout * 1000) + 1500}
        log.setdefault("outcome", "served")
        return self._page("worker.html", lang, 200, state=state, cfg=cfg)

    def _lookup(self, form: Mapping[str, Any], lang: str, deadline: Deadline, log: Dict[str, Any]) -> Response:
        try:
            operator = self._who(form, deadline, log)
        except Refused:
            return _json(403, {"state": "refused"})
        except Unavailable:
            return _json(200, {"state": "unavailable"})
        call_id, phone = str(form.get("CALL_ID") or "")[:200], str(form.get("PHONE_NUMBER") or "")[:40]
        log["call_id"] = call_id
        store = open_store(self.settings)
        try:
            card = lookup.dialer_card(store, operator, call_id, phone)
        finally:
            store.close()
        if card is None:
            log["outcome"] = "ordinary"
            return _json(200, {"state": "ordinary"})
        t, d = words(lang), self.settings.dialer
        title = t["card_title"].format(task=card.attempt.task_id,
                                       title=plain(card.task.title or card.attempt.info.get("title")))
        status = t["card_status"].format(n=card.number, max=d.max_attempts,
                                         time=card.client_time(d.default_timezone).strftime("%H:%M"))
        log.update(outcome="highlighted", task=card.attempt.task_id, linkedid=card.attempt.attempt_id)
        return _json(200, {"state": "dialer", "title": title, "status": status})

    # -- CALL_CARD ---------------------------------------------------------------------------------
    def _card(self, form: Mapping[str, Any], lang: str, deadline: Deadline, log: Dict[str, Any]) -> Response:
        try:
            operator = self._who(form, deadline, log)
        except Refused:
            return self._page("card.html", lang, 403, state="refused")
        except Unavailable:
            return self._page("card.html", lang, 200, state="unavailable")
        try:
            options = json.loads(str(form.get("PLACEMENT_OPTIONS") or "{}"))
        except ValueError:
            options = {}
        options = options if isinstance(options, dict) else {}
        call_id, phone = str(options.get("CALL_ID") or "")[:200], str(options.get("PHONE_NUMBER") or "")[:40]
        log["call_id"] = call_id
        store = open_store(self.settings)
        try:
            dialer = lookup.dialer_card(store, operator, call_id, phone)
            ordinary = None if dialer else lookup.ordinary_card(store, operator, call_id)
        finally:
            store.close()
        if dialer is not None:
            d = self.settings.dialer
            log.update(outcome="dialer", task=dialer.attempt.task_id, linkedid=dialer.attempt.attempt_id)
            url = task_url(self.settings, dialer.attempt.task_id, operator.user_id)
            return self._page("card.html", lang, 200, state="dialer", card=dialer, task_url=url,
                              max_attempts=d.max_attempts,
                              client_time=dialer.client_time(d.default_timezone).strftime("%H:%M (%Z)"))
        if ordinary is None:
            log["outcome"] = "unknown call"
            return self._page("card.html", lang, 200, state="unknown")
        manager, later = self._manager(ordinary.call, form, deadline, log)
        log.update(outcome="ordinary", linkedid=ordinary.call.linkedid)
        return self._page("card.html", lang, 200, state="ordinary", card=ordinary, manager=manager,
                          manager_later=later)

    def _manager(self, call: Any, form: Mapping[str, Any], deadline: Deadline,
                 log: Dict[str, Any]) -> "tuple[str, bool]":
        """The client's responsible manager, read with the operator's own token (his CRM rights)."""
        if call.crm_type not in ("CONTACT", "COMPANY", "LEAD") or not call.crm_id:
            return "", False
        client = self.verifier.client(str(form.get("AUTH_ID") or ""))
        commands = {"c": (f"crm.{call.crm_type.lower()}.get", {"id": int(call.crm_id)}),
                    "u": ("user.get", {"ID": "$result[c][ASSIGNED_BY_ID]"})}
        try:
            result = within(deadline, lambda: client.batch(commands, deadline=deadline))
        except (Unavailable, BitrixError) as exc:
            log["manager"] = str(exc)[:120]
            return "", True
        rows = result.results.get("u")
        row = rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else {}
        name = " ".join(str(p) for p in (row.get("NAME"), row.get("LAST_NAME")) if p)
        inner = str(row.get("UF_PHONE_INNER") or "")
        return (f"{name} ({inner})" if name and inner else name), False

    def _page(self, template: str, lang: str, status: int, **values: Any) -> Response:
        page = render(template, lang, library=self.settings.placements.bx24_js,
                      zone=self.settings.dialer.operator_timezone, **values)
        return Response(status, page["body"], headers={
            "Content-Security-Policy": csp(page["nonce"], self.settings.placements.bx24_js)})


def read_request(handler: Any) -> Mapping[str, Any]:
    """The form of a widget POST from a BaseHTTPRequestHandler (url-encoded, bounded)."""
    from agi_bitrix.bitrix.query import parse_php_query

    length = int(handler.headers.get("Content-Length") or 0)
    if not 0 <= length <= MAX_BODY:
        raise ValueError("oversized body")
    body = handler.rfile.read(length).decode("utf-8") if length else ""
    return parse_php_query(body)


def respond(handler: Any, app: PlacementApp, verb: str) -> None:
    """Answer one widget request on a BaseHTTPRequestHandler (`serve` and, later, the service)."""
    try:
        form = read_request(handler) if verb == "POST" else {}
    except (ValueError, UnicodeDecodeError) as exc:
        resp = Response(400, f"malformed: {exc}\n".encode(), "text/plain; charset=utf-8")
    else:
        resp = app.handle(verb, handler.path, form)
    handler.send_response(resp.status)
    handler.send_header("Content-Type", resp.content_type)
    handler.send_header("Content-Length", str(len(resp.body)))
    # The page holds the operator's token: never cached, never sent on as a referrer.
    handler.send_header("Cache-Control", "no-store")
    handler.send_header("Referrer-Policy", "no-referrer")
    handler.send_header("X-Content-Type-Options", "nosniff")
    for key, value in resp.headers.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(resp.body)
