"""Who opened the widget: the frame's AUTH_ID checked against our own portal, cached briefly.

Bitrix24 POSTs a placement frame the OAuth access token of the employee who opened it (Bitrix24
REST docs: api-reference/widgets/_includes/widget_data.md). `user.current` with that token, sent
to the portal in our settings (never to the DOMAIN the request names), answers with that employee
(api-reference/user/user-current.md); a token of another portal or a made-up one is refused there,
and `app.info` must name our application (a token of another application proves nothing to us).
`member_id` must be our portal's, and APPLICATION_TOKEN, when we know ours, must match.
"""
from __future__ import annotations

import hashlib
import hmac
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Tuple, TypeVar
from urllib.parse import urlsplit

from agi_bitrix.allowance import Allowance
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.bitrix.install import OneToken
from agi_bitrix.bitrix.errors import AuthError, BitrixError, ScopeError
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.deadline import Deadline
from agi_bitrix.settings import Settings

_TOKEN = re.compile(r"[A-Za-z0-9._\-]{16,512}")
CACHE_MAX = 2000
# Unconfirmed tokens may cost at most this many `user.current` requests (burst, then per second):
# made-up tokens must not spend the PBX's request budget that the calls need.
ASK_BURST, ASK_PER_SECOND = 10, 1.0
T = TypeVar("T")


class Refused(Exception):
    """Forged, foreign or expired credentials: the request gets nothing."""


class Unavailable(Exception):
    """The portal did not confirm in time (slow, down): the widget falls back to showing nothing."""


@dataclass(frozen=True)
class Operator:
    user_id: int
    name: str
    inner: str


def within(deadline: Deadline, work: Callable[[], T]) -> T:
    """Run `work` in a helper thread and wait at most the budget: a socket timeout alone does not
    bound a portal that drips bytes. A late answer still finishes in the background."""
    box: "queue.Queue[Tuple[bool, Any]]" = queue.Queue(1)

    def run() -> None:
        try:
            box.put((True, work()))
        except BaseException as exc:  # handed to the waiting thread
            box.put((False, exc))

    threading.Thread(target=run, daemon=True, name="agi-bitrix-widget-portal").start()
    try:
        ok, value = box.get(timeout=max(0.0, deadline.remaining()))
    except queue.Empty:
        raise Unavailable("the portal did not answer in time") from None
    if ok:
        return value
    raise value


class Verifier:
    """Checks frames' credentials; one per server (its cache lives as long as the server)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.lock = threading.Lock()
        self.cache: Dict[str, Tuple[float, Operator]] = {}
        self.asks = Allowance(ASK_BURST, ASK_PER_SECOND, clock)  # made-up tokens cannot spend the budget

    def rest_base(self) -> str:
        return self.settings.bitrix24.portal_url + "rest/"

    def client(self, token: str) -> Bitrix24:
        """A REST client acting as the employee himself (his own permissions in the portal)."""
        b24 = self.settings.bitrix24
        limiter = RateLimiter(self.settings.storage.state_dir, urlsplit(b24.portal_url).netloc,
                              b24.rate_burst, b24.rate_per_second)
        return Bitrix24(OneToken(self.rest_base(), token), timeout=self.settings.placements.timeout,
                        limiter=limiter)

    def _ours(self) -> Tuple[str, str]:
        from agi_bitrix.bitrix.oauth import TokenStoreError, token_store

        if self.settings.bitrix24.mode != "oauth":
            raise Refused("widgets need the local application ([bitrix24] portal_url, client_id, client_secret)")
        try:
            tokens = token_store(self.settings).load()
        except TokenStoreError as exc:
            raise Refused(f"no application tokens: {exc}") from None
        if tokens is None or not tokens.member_id:
            raise Refused("the application is not installed yet (no member_id known)")
        return tokens.member_id, tokens.application_token or ""

    def operator(self, form: Mapping[str, Any], deadline: Deadline) -> Tuple[Operator, str]:
        """The employee behind this request and his token, or Refused / Unavailable."""
        member_id, app_token = self._ours()
        if not hmac.compare_digest(str(form.get("member_id") or ""), member_id):
            raise Refused("request from a foreign portal (member_id)")
        given_app = form.get("APPLICATION_TOKEN")
        if app_token and given_app is not None and not hmac.compare_digest(str(given_app), app_token):
            raise Refused("wrong APPLICATION_TOKEN")
        token = str(form.get("AUTH_ID") or "")
        if not _TOKEN.fullmatch(token):
            raise Refused("no usable AUTH_ID")
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        with self.lock:
            hit = self.cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1], token
        self._spend(now)
        found = within(deadline, lambda: self._ask(token, deadline))
        with self.lock:
            if len(self.cache) >= CACHE_MAX:
                self.cache = {k: v for k, v in self.cache.items() if v[0] > now}
                if len(self.cache) >= CACHE_MAX:
                    self.cache.clear()
            self.cache[key] = (now + self.settings.placements.auth_cache, found)
        return found, token

    def _spend(self, now: float) -> None:
        if not self.asks.take(now):
            raise Unavailable("too many unconfirmed widget requests; the portal is not asked")

    def _ask(self, token: str, deadline: Deadline) -> Operator:
        # One request: who the token's user is, and whose application the token is (a real token
        # of another application on our portal proves nothing to us; Bitrix24 REST docs: app.info).
        commands = {"me": ("user.current", {}), "app": ("app.info", {})}
        try:
            answer = self.client(token).batch(commands, deadline=deadline)
            for key, (method, _) in commands.items():
                error = answer.error(key, method)
                if error is not None:
                    raise error
        except (AuthError, ScopeError) as exc:
            raise Refused(f"the portal did not accept the AUTH_ID ({exc.code})") from None
        except BitrixError as exc:
            raise Unavailable(exc.summary()) from None
        app = answer.results.get("app")
        if not isinstance(app, dict) or str(app.get("CODE") or "") != self.settings.bitrix24.client_id:
            raise Refused("the AUTH_ID belongs to another application")
        row = answer.results.get("me")
        if not isinstance(row, dict) or not str(row.get("ID") or "").isdigit():
            raise Unavailable("user.current answered without a user")
        name = " ".join(str(p) for p in (row.get("NAME"), row.get("LAST_NAME")) if p) or f"#{row['ID']}"
        return Operator(int(row["ID"]), name, str(row.get("UF_PHONE_INNER") or "").strip())
