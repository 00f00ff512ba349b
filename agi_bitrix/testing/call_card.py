"""A stand-in Bitrix24 call card for browser tests and screenshots of the widgets.

A page of "the portal" (served on 127.0.0.1: Chromium's Local Network Access checks refuse a
loopback frame inside a page of unknown address) POSTs the placement form into a frame, exactly as Bitrix24 opens a widget (Bitrix24 REST docs:
api-reference/widgets/index.md), and plays the call card for it. The frame's BX24 library
(https://api.bitrix24.com/api/v1/, also routed) is a stand-in that speaks to the portal page by
postMessage: `BX24.init`, `getAuth`, `placement.info`, `placement.getInterface`, `placement.call`,
`placement.bindEvent`. The portal page records every command and fires
`BackgroundCallCard::initialized` when the test opens the card. Commands sent while no card is open
answer `Call card is undefined`, like the real card (widgets/ui-interaction/page-background-worker).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict

LIBRARY = "https://api.bitrix24.com/api/v1/"
CHROMIUM = os.environ.get("AGI_BITRIX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As root on a closed network: no sandbox, no background connections (they would be refused).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
WORKER_COMMANDS = ["CallCardSetMute", "CallCardSetHold", "CallCardSetUiState", "CallCardGetListUiStates",
                   "CallCardSetCardTitle", "CallCardSetStatusText", "CallCardClose"]
CARD_COMMANDS = ["getStatus", "disableAutoClose", "enableAutoClose"]

STAND_IN = r"""
(function () {
  var seq = 0, pending = {}, handlers = {}, ctx = {placement: 'DEFAULT', options: {}, auth: null};
  function send(msg, cb) { msg.id = ++seq; if (cb) { pending[msg.id] = cb; } window.parent.postMessage(msg, '*'); }
  window.addEventListener('message', function (e) {
    if (e.source !== window.parent) { return; }
    var m = e.data || {};
    if (m.type === 'reply' && pending[m.id]) { var cb = pending[m.id]; delete pending[m.id]; cb(m.result); }
    if (m.type === 'event') { (handlers[m.event] || []).forEach(function (h) { h(m.data); }); }
  });
  window.BX24 = {
    init: function (cb) { send({type: 'init'}, function (r) { ctx = r; cb(); }); },
    getAuth: function () { return ctx.auth ? {access_token: ctx.auth, member_id: ctx.member_id} : false; },
    placement: {
      info: function () { return {placement: ctx.placement, options: ctx.options}; },
      getInterface: function (cb) { send({type: 'getInterface'}, cb); },
      call: function (command, params, cb) { send({type: 'call', command: command, params: params || {}}, cb); },
      bindEvent: function (event, cb) { (handlers[event] = handlers[event] || []).push(cb); send({type: 'bindEvent', event: event}); }
    }
  };
})();
"""

PORTAL_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Bitrix24 (stand-in)</title>
<style>body{margin:0;background:#eef2f4;font:13px Arial} .card{width:560px;margin:16px;background:#fff;
border-radius:8px;box-shadow:0 2px 8px rgba(0,0,0,.15)} .head{padding:12px 16px;background:#535c69;color:#fff;
border-radius:8px 8px 0 0} .head .title{font-weight:bold} .tabs{padding:8px 16px;border-bottom:1px solid #e6e9ec}
.tabs b{color:#2067b0} iframe{border:0;width:100%%;height:%(height)dpx}</style></head>
<body><div class="card"><div class="head"><div class="title" id="card-title">%(card_title)s</div>
<div id="card-status">%(card_status)s</div></div><div class="tabs">%(tabs)s</div>
<iframe name="widget" id="widget"></iframe></div>
<script>
var SETUP = %(setup)s;
window.card = {open: false, commands: [], bound: [], errors: []};
var frame = document.getElementById('widget');
window.addEventListener('message', function (e) {
  if (e.source !== frame.contentWindow) { return; }
  var m = e.data || {};
  function reply(result) { frame.contentWindow.postMessage({type: 'reply', id: m.id, result: result}, '*'); }
  if (m.type === 'init') { reply({placement: SETUP.placement, options: SETUP.options, auth: SETUP.body.AUTH_ID,
                                  member_id: SETUP.body.member_id}); }
  if (m.type === 'getInterface') { reply(SETUP.iface); }
  if (m.type === 'bindEvent') { window.card.bound.push(m.event); }
  if (m.type === 'call') {
    if (SETUP.iface.command.indexOf(m.command) < 0) { return; }  /* unknown commands are ignored silently */
    if (SETUP.placement === 'PAGE_BACKGROUND_WORKER' && !window.card.open) {
      window.card.errors.push(m.command); reply([{result: 'error', errorCode: 'Call card is undefined'}]); return;
    }
    window.card.commands.push([m.command, m.params]);
    if (m.command === 'CallCardSetCardTitle') { document.getElementById('card-title').textContent = m.params.title; }
    if (m.command === 'CallCardSetStatusText') { document.getElementById('card-status').textContent = m.params.statusText; }
    reply([]);
  }
});
window.openCard = function (data) {
  window.card.open = true;
  frame.contentWindow.postMessage({type: 'event', event: 'BackgroundCallCard::initialized', data: data}, '*');
};
var form = document.createElement('form');
form.method = 'POST'; form.target = 'widget'; form.action = SETUP.action;
Object.keys(SETUP.body).forEach(function (k) {
  var input = document.createElement('input'); input.type = 'hidden'; input.name = k; input.value = SETUP.body[k];
  form.appendChild(input);
});
document.body.appendChild(form);
form.submit();
</script></body></html>
"""


def portal_page(action: str, query: Dict[str, str], body: Dict[str, str], *, card_title: str = "Входящий звонок",
                card_status: str = "", tabs: str = "", height: int = 60) -> str:
    """The portal's page that opens the widget at `action` with this query string and POST body."""
    from urllib.parse import urlencode

    placement = body.get("PLACEMENT", "")
    try:
        options = json.loads(body.get("PLACEMENT_OPTIONS") or "{}")
    except ValueError:
        options = {}
    iface = ({"command": WORKER_COMMANDS, "event": ["BackgroundCallCard::initialized"]}
             if placement == "PAGE_BACKGROUND_WORKER" else
             {"command": CARD_COMMANDS, "event": ["CallCard::CallStateChanged", "CallCard::BeforeClose"]})
    setup = {"action": action + ("&" if "?" in action else "?") + urlencode(query), "body": body,
             "placement": placement, "options": options, "iface": iface}
    # </ cannot end the script early: JSON has no raw '<' once escaped.
    text = json.dumps(setup, ensure_ascii=False).replace("<", "\\u003c")
    from html import escape

    return PORTAL_PAGE % {"setup": text, "card_title": escape(card_title), "card_status": escape(card_status),
                          "tabs": tabs, "height": height}


def _serve_page(page: Any) -> Any:
    """A loopback server answering every GET with the current portal page."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            body = page().encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    return server


class Browser:
    """Headless Chromium (the system's) under Playwright, with the portal and library routed."""

    def __init__(self, profile: Path) -> None:
        from playwright.sync_api import sync_playwright

        if not Path(CHROMIUM).exists():
            raise RuntimeError(f"Chromium not found at {CHROMIUM}: install Debian's chromium package "
                               "(make test does it as root) or set AGI_BITRIX_CHROMIUM")
        self._pw = sync_playwright().start()
        self.context = self._pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 600, "height": 620})
        self.dialogs: list = []
        self.console: list = []  # the pages' console lines, for a failing test's message
        self.page_html = ""
        self.library_loads = 0

        def library(route: Any) -> None:
            self.library_loads += 1
            route.fulfill(status=200, content_type="application/javascript", body=STAND_IN)

        self.context.route(LIBRARY + "**", library)
        self.context.route(LIBRARY, library)
        self.portal = _serve_page(lambda: self.page_html)

    def open(self, html: str) -> Any:
        """A fresh tab showing this portal page (the widget's frame is `widget(page)`)."""
        self.page_html = html
        page = self.context.new_page()
        page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("console", lambda msg: self.console.append(msg.text))
        page.goto(f"http://127.0.0.1:{self.portal.server_address[1]}/")
        return page

    @staticmethod
    def widget(page: Any) -> Any:
        return page.frame(name="widget")

    def wait_state(self, page: Any, states: Any, timeout_ms: int = 20000) -> str:
        """Wait until the widget frame reports one of `states` (data-agi-state on its <html>); the
        frame is cross-origin, so it is read inside the frame."""
        end = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < end:
            frame = page.frame(name="widget")
            if frame is not None and frame.url not in ("", "about:blank"):
                try:
                    state = frame.evaluate("() => document.documentElement.getAttribute('data-agi-state')")
                except Exception:  # the frame is navigating
                    state = None
                if state in states:
                    return state
            page.wait_for_timeout(100)
        frame = page.frame(name="widget")
        seen = frame.evaluate("() => document.body ? document.body.innerText.slice(0, 300) : null") if frame else None
        raise AssertionError(f"the widget never reached {sorted(states)}; frame: {seen!r}; console: {self.console[-5:]}")

    def close(self) -> None:
        self.context.close()
        self._pw.stop()
        self.portal.shutdown()
        self.portal.server_close()


def card_commands(page: Any) -> list:
    return page.evaluate("() => window.card.commands")
