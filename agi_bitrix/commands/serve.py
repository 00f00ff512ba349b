"""`agi-bitrix serve`: the HTTP handler for Bitrix24 events and the application's install callback.

Put it behind your https proxy and give its public address to Bitrix24 (`[events] handler_url`).
The install callback is stored only once proven (bitrix/install.py). Every event must carry the
application_token stored from it and our portal's member_id and domain; anything else is refused
with a log line and nothing is dialed. Bitrix24 does not retry slow deliveries, so the answer is
immediate and the work happens in a thread. The server's limits are in http_server.py.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Dict
from urllib.parse import urlsplit

from agi_bitrix import http_server
from agi_bitrix import settings as settings_mod


class SharedAMI:
    """One AMI connection for the whole server, opened on first use."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.lock = threading.Lock()
        self.client: Any = None

    def __call__(self) -> Any:
        from agi_bitrix.pbx.ami import AMIClient

        with self.lock:
            if self.client is None:
                ast = self.settings.asterisk
                self.client = AMIClient(ast.ami_host, ast.ami_port, ast.ami_user, ast.ami_secret)
            return self.client


def _event_id(form: Dict[str, Any]) -> str:
    """The event's own identity: the second Bitrix24 stamped on it, `ts` (Bitrix24 REST docs: events),
    which a delivery of the same event again carries too; with the number it keys a callback request."""
    ts = str(form.get("ts") or "")
    return f"ts-{ts}" if ts.isdigit() and len(ts) <= 12 else ""


def process_event(settings: Any, ami: Any, logger: Any, event: str, data: Any, event_id: str = "") -> None:
    """Handle one verified event with this thread's own store and client."""
    from agi_bitrix.bitrix.factory import make_client
    from agi_bitrix.events import EventProcessor, EventRefused
    from agi_bitrix.store import StoreError
    from agi_bitrix.stores import open_store

    fields: Dict[str, Any] = {}
    started = time.monotonic()
    try:
        store = open_store(settings)
    except StoreError as exc:  # the shared store is away: the click waits for nobody, it is refused
        logger.error(event.lower(), reason=str(exc))
        return
    try:
        outcome = EventProcessor(settings, store, make_client(settings), ami, fields).handle(event, data, event_id)
        logger.info(event.lower(), outcome=outcome, ms=int((time.monotonic() - started) * 1000), **fields)
    except EventRefused as exc:
        logger.error(event.lower(), reason=str(exc), **fields)
    except Exception as exc:  # one bad event must not take the server down
        logger.error(event.lower(), reason=f"{type(exc).__name__}: {exc}", **fields)
    finally:
        store.close()


def install(settings: Any, logger: Any, auth: Any, gate: Any) -> str:
    """The installation callback: proven (bitrix/install.py), then stored; the events bound."""
    from agi_bitrix.bitrix import install as install_mod
    from agi_bitrix.bitrix import oauth
    from agi_bitrix.bitrix.factory import make_client
    from agi_bitrix.events import EventRefused, bind_events
    from agi_bitrix.placements.bind import bind_summary

    if settings.bitrix24.mode != "oauth":
        raise EventRefused("install callback, but [bitrix24] is not set up as a local application")
    try:
        previous = oauth.token_store(settings).load()
    except oauth.TokenStoreError:
        previous = None  # a damaged store is what a proven installation repairs
    try:
        tokens = install_mod.accept(settings.bitrix24, auth, previous, gate)
    except install_mod.InstallRefused as exc:
        raise EventRefused(str(exc)) from None
    oauth.install(settings.storage.state_dir, tokens, oauth.token_store(settings))
    client = make_client(settings)
    bound = bind_events(client, settings)
    logger.info("install", bound=bound, replaced=previous is not None, member_id=tokens.member_id,
                widgets=bind_summary(client, settings))
    return "installed"


def limits_of(settings: Any) -> http_server.Limits:
    return http_server.Limits(max_connections=settings.events.max_connections,
                              request_timeout=settings.events.request_timeout)


def make_handler(settings: Any, logger: Any, ami: Any) -> type:
    """The request handler for Bitrix24's events and the install callback (mount it on http_server)."""
    from agi_bitrix.bitrix.install import ProofGate
    from agi_bitrix.placements.app import PlacementApp, respond

    gate = ProofGate()  # one per server: forged installation callbacks are rationed together
    widgets = PlacementApp(settings, logger)

    class Handler(BaseHTTPRequestHandler):
        server_version = "agi-bitrix"

        def log_message(self, fmt: str, *args: Any) -> None:  # our own log, not stderr
            return

        def _answer(self, status: int, text: str) -> None:
            body = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if widgets.serves(self.path):
                return respond(self, widgets, "GET")
            self._answer(200, "agi-bitrix event handler\n")

        def do_POST(self) -> None:
            from agi_bitrix.bitrix import oauth
            from agi_bitrix.events import BOUND_EVENTS, EventRefused, verify
            from agi_bitrix.http_server import BadRequest, read_form

            if widgets.serves(self.path):  # the call-card widgets (agi_bitrix/placements)
                return respond(self, widgets, "POST")
            peer = self.client_address[0]
            try:
                form = read_form(self)
            except BadRequest as exc:
                logger.error("event_refused", reason=f"malformed request: {exc}", peer=peer)
                self._answer(400, "malformed\n")
                return
            event = str(form.get("event") or "").upper()
            try:
                if event in ("ONAPPINSTALL", "ONAPPUPDATE") or (not event and isinstance(form.get("auth"), dict)):
                    self._answer(200, install(settings, logger, form.get("auth"), gate) + "\n")
                    return
                if event not in BOUND_EVENTS:
                    raise EventRefused(f"unexpected event {event[:40]!r}")
                tokens = oauth.token_store(settings).load()
                verify(form.get("auth"), tokens.application_token if tokens else "",
                       tokens.member_id if tokens else "", urlsplit(settings.bitrix24.portal_url).netloc)
            except EventRefused as exc:
                logger.error("event_refused", bitrix_event=event[:40] or None, reason=str(exc), peer=peer)
                self._answer(403, "refused\n")
                return
            except Exception as exc:
                logger.error("event_failed", bitrix_event=event[:40], reason=f"{type(exc).__name__}: {exc}")
                self._answer(500, "failed\n")
                return
            self._answer(200, "ok\n")  # Bitrix24 gets its answer now; the call is set up after
            threading.Thread(target=process_event, daemon=True,
                             args=(settings, ami, logger, event, form.get("data"), _event_id(form))).start()

    return Handler


def run(args: Any) -> int:
    from agi_bitrix import log as log_mod

    try:
        settings = settings_mod.load(getattr(args, "settings", None))
    except settings_mod.SettingsError as exc:
        print(f"agi-bitrix serve: {exc}", file=sys.stderr)
        return 1
    logger = log_mod.configure(settings.logging.file, settings.logging.level, settings.secrets())
    try:
        server = http_server.build(settings.events.listen, make_handler(settings, logger, SharedAMI(settings)),
                                   limits_of(settings), logger)
    except OSError as exc:
        print(f"agi-bitrix serve: cannot listen on {settings.events.listen}: {exc.strerror}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    logger.info("serve_started", listen=settings.events.listen)
    print(f"listening on {settings.events.listen}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    server.server_close()
    logger.info("serve_stopped")
    return 0
