"""The Bitrix24 client against the emulator: error taxonomy, batch, 503 backoff, 429, the shared
rate budget and the OAuth token store (unit level; the entry-point scenarios are in test_oauth.py
and test_limits.py)."""
from __future__ import annotations

import json
import os
import stat
import threading
import time
from typing import Any, Dict, List

import pytest

from agi_bitrix.bitrix import query
from agi_bitrix.bitrix.auth import WebhookAuth
from agi_bitrix.bitrix.client import BATCH_MAX, BatchResult, Bitrix24
from agi_bitrix.bitrix.errors import (AuthError, ExpiredToken, LimitError, NetworkError, NotFoundError,
                                      PortalError, ScopeError, classify)
from agi_bitrix.bitrix.oauth import OAuthAuth, TokenStore, Tokens, authorize, grant, token_url
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.deadline import Deadline
from agi_bitrix.settings import Bitrix24Settings
from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator


@pytest.fixture
def emu():
    with Bitrix24Emulator() as emulator:
        emulator.add_user("Anna", "Test", inner="101")
        emulator.add_user("Boris", "Test", inner="102")
        yield emulator


def webhook_client(emu: Bitrix24Emulator, tmp_path: Any = None, **limits: Any) -> Bitrix24:
    limiter = RateLimiter(str(tmp_path), "portal", **limits) if tmp_path is not None else None
    return Bitrix24(WebhookAuth(emu.webhook_url), timeout=2, limiter=limiter)


def oauth_settings(emu: Bitrix24Emulator, **extra: Any) -> Bitrix24Settings:
    values = dict(portal_url=emu.base_url, client_id=emu.client_id, client_secret=emu.client_secret,
                  oauth_url=emu.oauth_url)
    values.update(extra)
    return Bitrix24Settings(**values)


# ---------------------------------------------------------------------------- taxonomy

@pytest.mark.parametrize("status,code,kind,retryable", [
    (401, "expired_token", ExpiredToken, True),
    (401, "invalid_token", AuthError, False),
    (401, "NO_AUTH_FOUND", AuthError, False),
    (401, "NOT_INSTALLED", AuthError, False),
    (400, "invalid_grant", AuthError, False),
    (403, "insufficient_scope", ScopeError, False),
    (401, "insufficient_scope", ScopeError, False),
    (403, "INVALID_CREDENTIALS", ScopeError, False),
    (403, "WRONG_AUTH_TYPE", ScopeError, False),
    (403, "ACCESS_DENIED", ScopeError, False),
    (503, "QUERY_LIMIT_EXCEEDED", LimitError, True),
    (429, "OPERATION_TIME_LIMIT", LimitError, True),
    (503, "OVERLOAD_LIMIT", LimitError, True),
    (404, "ERROR_METHOD_NOT_FOUND", NotFoundError, False),
    (400, "ERROR_CORE", PortalError, False),
    (502, "", NetworkError, True),
    (500, "INTERNAL_SERVER_ERROR", NetworkError, True),
])
def test_error_taxonomy_says_what_is_retryable(status, code, kind, retryable):
    err = classify(status, code, "text", "some.method")
    assert type(err) is kind and err.retryable is retryable
    assert "some.method" in str(err) and code in str(err)


def test_errors_come_typed_from_the_wire(emu, tmp_path):
    client = webhook_client(emu)
    emu.fail_next(400, "ERROR_CORE", "User is not found or is not active", method="user.get")
    with pytest.raises(NotFoundError):
        client.call("user.get")
    with pytest.raises(NotFoundError):
        client.call("no.such.method")
    emu.fail_next(502, "", body="<html>Bad gateway</html>", method="scope")
    with pytest.raises(NetworkError) as info:
        client.call("scope")
    assert info.value.retryable
    emu.scopes = ["crm"]
    with pytest.raises(ScopeError):
        client.call("user.get")
    bad = Bitrix24(WebhookAuth(emu.webhook_url.replace(emu.webhook_code, "wrong")), timeout=2)
    with pytest.raises(AuthError):
        bad.call("scope")


# ---------------------------------------------------------------------------- batch

def test_batch_references_errors_and_empty_maps(emu):
    client = webhook_client(emu)
    call_id = client.call("telephony.externalcall.register", {
        "USER_PHONE_INNER": "101", "PHONE_NUMBER": "+79161234567", "TYPE": 2,
        "CALL_START_DATE": "2026-01-01T10:00:00+03:00"})["CALL_ID"]
    result = client.batch({
        "u102": ("user.get", {"FILTER": {"UF_PHONE_INNER": "102", "ACTIVE": "true"}}),
        "show": ("telephony.externalcall.show", {"CALL_ID": call_id, "USER_ID": "$result[u102][0][ID]"}),
        "bad": ("telephony.externalcall.show", {"CALL_ID": call_id, "USER_ID": "$result[nothing][0][ID]"}),
        "gone": ("crm.lead.get", {"ID": 999}),
    })
    assert result.results["u102"][0]["UF_PHONE_INNER"] == "102"
    assert result.results["show"] is True
    assert isinstance(result.error("gone", "crm.lead.get"), NotFoundError)
    assert result.error("show") is None and result.totals["u102"] == 1
    boris = [uid for uid, u in emu.users.items() if u["UF_PHONE_INNER"] == "102"][0]
    assert boris in emu.calls[call_id]["shown"]
    assert len([r for r in emu.requests if not r["batch"]]) == 2  # register + one batch

    clean = client.batch({"s": ("scope", {})})  # no errors at all: result_error comes as []
    assert clean.errors == {} and clean.error("s") is None
    assert client.batch({}).results == {}
    with pytest.raises(ValueError):
        client.batch({f"k{i}": ("scope", {}) for i in range(BATCH_MAX + 1)})


def test_batch_result_accepts_lists_and_empty_arrays():
    body = {"result": ["a", "b"], "result_error": [], "result_total": [], "result_next": []}
    parsed = BatchResult(body)
    assert parsed.results == {"0": "a", "1": "b"} and parsed.errors == {} and parsed.next == {}
    limited = BatchResult({"result": [], "result_error": {"x": {"error": "OPERATION_TIME_LIMIT",
                                                                 "error_description": "blocked"}}})
    assert isinstance(limited.error("x"), LimitError) and limited.error("x").retryable


def test_only_exact_result_references_go_unencoded():
    assert query.build({"ID": "$result[u101][0][ID]"}) == "ID=$result[u101][0][ID]"
    smuggled = query.build({"PHONE_NUMBER": "$result[x]&USER_ID=1"})
    assert "&USER_ID" not in smuggled and smuggled.startswith("PHONE_NUMBER=%24result")


# ---------------------------------------------------------------------------- limits

class FakeTime:
    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.slept: List[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_rate_budget_is_shared_through_the_file(tmp_path):
    t = FakeTime()
    first = RateLimiter(str(tmp_path), "portal.bitrix24.ru", burst=3, per_second=2, clock=t.clock, sleep=t.sleep)
    other = RateLimiter(str(tmp_path), "portal.bitrix24.ru", burst=3, per_second=2, clock=t.clock, sleep=t.sleep)
    budget = Deadline(10)
    assert [first.acquire("m", budget) for _ in range(3)] == [0, 0, 0]
    assert other.acquire("m", budget) == pytest.approx(0.5)  # another process sees the same bucket
    t.slept.clear()
    assert first.acquire("m", budget) == pytest.approx(0.5)  # queued behind the previous slot
    with pytest.raises(LimitError) as info:
        other.acquire("m", Deadline(0.2))
    assert info.value.code == "RATE_BUDGET" and info.value.retryable
    t.now += 10  # drained
    assert first.acquire("m", budget) == 0
    first.saturated()  # a 503: the portal's bucket is full whatever we thought
    assert other.acquire("m", budget) == pytest.approx(0.5)
    assert stat.S_IMODE(os.stat(first.path).st_mode) == 0o600
    other_portal = RateLimiter(str(tmp_path), "other.bitrix24.ru", burst=1, per_second=1, clock=t.clock)
    assert other_portal.acquire("m", budget) == 0


def test_rate_file_rewritten_in_place_holds_only_the_new_state(tmp_path):
    # Overwritten and cut to length (never truncated to zero first): no tail of older, longer text.
    t = FakeTime()
    limiter = RateLimiter(str(tmp_path), "p", burst=3, per_second=2, clock=t.clock, sleep=t.sleep)
    limiter.path.write_text("{torn write " + "x" * 500)
    assert limiter.acquire("m", Deadline(10)) == 0
    assert json.loads(limiter.path.read_text()) == {"level": 1.0, "at": t.now}
    limiter.block("m", t.now + 42)
    t.now += 1
    limiter.acquire("n", Deadline(10))
    assert json.loads(limiter.path.read_text())["blocked"] == {"m": t.now + 41}


def test_429_blocks_the_method_until_operating_reset_at(tmp_path):
    t = FakeTime()
    limiter = RateLimiter(str(tmp_path), "p", clock=t.clock, sleep=t.sleep)
    limiter.observe("crm.lead.list", {"operating": 470.5, "operating_reset_at": t.now + 42})
    assert limiter.block("crm.lead.list") == t.now + 42  # the last good answer's reset time
    with pytest.raises(LimitError) as info:
        limiter.acquire("crm.lead.list", Deadline(10))
    assert info.value.reset_at == t.now + 42
    assert limiter.acquire("scope", Deadline(10)) == 0  # other methods go on
    t.now += 43
    assert limiter.acquire("crm.lead.list", Deadline(10)) == 0
    assert limiter.block("user.get") == t.now + 60  # nothing known: one minute
    assert limiter.block("user.get", reset_at=t.now + 5) == t.now + 5


def test_503_is_retried_with_backoff_within_the_deadline(emu, tmp_path):
    client = webhook_client(emu, tmp_path)
    emu.fail_next(503, "QUERY_LIMIT_EXCEEDED", "Too many requests", method="scope", count=2)
    assert "telephony" in client.call("scope", deadline=Deadline(10))
    assert client.limit_retries == 2 and len(emu.requests_for("scope")) == 3

    emu.fail_next(503, "QUERY_LIMIT_EXCEEDED", "Too many requests", method="scope", count=50)
    with pytest.raises(LimitError) as info:
        client.call("scope", deadline=Deadline(1.0))
    # Given up inside the budget: on the portal's 503, or on our own budget it saturated.
    assert info.value.retryable and info.value.code in ("QUERY_LIMIT_EXCEEDED", "RATE_BUDGET")
    emu.clear_faults()


def test_429_from_the_portal_holds_the_method_back(emu, tmp_path):
    client = webhook_client(emu, tmp_path)
    client.call("user.get")
    emu.set_operating_limit("user.get", emu.clock() + 300)
    with pytest.raises(LimitError) as info:
        client.call("user.get")
    assert info.value.status == 429 and info.value.reset_at is not None
    sent = len(emu.requests_for("user.get"))
    with pytest.raises(LimitError):
        webhook_client(emu, tmp_path).call("user.get")  # another process: not even sent
    assert len(emu.requests_for("user.get")) == sent
    assert client.call("scope")  # the rest of the API is unaffected


# ---------------------------------------------------------------------------- OAuth units

def test_token_url_comes_from_server_endpoint():
    assert token_url("https://oauth.bitrix24.tech/rest/", "https://oauth.bitrix.info/oauth/token/") == \
        "https://oauth.bitrix24.tech/oauth/token/"
    assert token_url("", "https://oauth.bitrix.info/oauth/token/") == "https://oauth.bitrix.info/oauth/token/"


def test_oauth_store_refresh_and_rotation(emu, tmp_path):
    settings = oauth_settings(emu)
    tokens = authorize(settings, str(tmp_path), code=emu.authorization_code())
    assert "access_token" not in repr(tokens) and tokens.access_token not in repr(tokens)
    store = TokenStore(str(tmp_path))
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.lock_path).st_mode) == 0o600
    assert store.load().server_endpoint == emu.server_endpoint

    one = Bitrix24(OAuthAuth(settings, str(tmp_path)), timeout=2)
    two = Bitrix24(OAuthAuth(settings, str(tmp_path)), timeout=2)  # read the same pair
    emu.expire_access_tokens()
    assert one.call("scope") and emu.refresh_count == 1 and one.auth.refreshed
    # `two` still holds the old, now dead pair: invalid_token -> reload -> retry, no refresh.
    assert two.call("scope") and emu.refresh_count == 1 and not two.auth.refreshed
    saved = json.loads(store.path.read_text())
    assert saved["access_token"] == one.auth.tokens.access_token != tokens.access_token

    # A long-lived process (the worker) holds a pair rotated away, and the stored one has expired
    # too: reload (invalid_token), then refresh (expired_token) from the stored refresh token.
    three = Bitrix24(OAuthAuth(settings, str(tmp_path)), timeout=2)
    emu.expire_access_tokens()
    assert one.call("scope") and emu.refresh_count == 2
    emu.expire_access_tokens()
    assert three.call("scope") and emu.refresh_count == 3 and emu.spent_refresh_uses == 0
    assert two.call("scope") and emu.refresh_count == 3  # adopts the pair `three` stored


def test_invalid_token_waits_for_a_refresh_in_flight(emu, tmp_path):
    """The OAuth server kills the old pair before the refreshing process has stored the new one."""
    settings = oauth_settings(emu)
    first = authorize(settings, str(tmp_path), code=emu.authorization_code())
    client = Bitrix24(OAuthAuth(settings, str(tmp_path)), timeout=2)
    store = TokenStore(str(tmp_path))
    rotated = threading.Event()

    def refresher() -> None:
        with store.locked(5):
            body = grant(emu.oauth_url, {"grant_type": "refresh_token", "client_id": emu.client_id,
                                         "client_secret": emu.client_secret, "refresh_token": first.refresh_token})
            rotated.set()
            time.sleep(0.3)  # the new pair is not on disk yet
            store.save(Tokens.from_grant(body, emu.client_endpoint))

    thread = threading.Thread(target=refresher)
    thread.start()
    assert rotated.wait(30)
    assert client.call("scope", deadline=Deadline(5))  # invalid_token -> waits for the lock -> new pair
    thread.join()
    assert emu.refresh_count == 1 and client.auth.tokens.access_token == store.load().access_token


def test_spent_refresh_token_is_never_sent_twice(emu, tmp_path):
    settings = oauth_settings(emu)
    authorize(settings, str(tmp_path), code=emu.authorization_code())
    emu.expire_access_tokens()
    emu.revoke_app()
    client = Bitrix24(OAuthAuth(settings, str(tmp_path)), timeout=2)
    with pytest.raises(AuthError) as info:
        client.call("scope")
    assert info.value.code == "invalid_grant" and "run agi-bitrix auth" in info.value.description
    assert not info.value.retryable
    asked = len(emu.requests_for("oauth.token"))
    again = Bitrix24(OAuthAuth(settings, str(tmp_path)), timeout=2)
    with pytest.raises(AuthError):
        again.call("scope")
    assert len(emu.requests_for("oauth.token")) == asked  # marked refused in the store
    assert TokenStore(str(tmp_path)).load().refused.startswith("invalid_grant")


def test_a_rotation_outside_the_lock_is_adopted_not_fatal(emu, tmp_path, monkeypatch):
    """invalid_grant because somebody rotated the chain meanwhile: reload and retry."""
    from agi_bitrix.bitrix import oauth

    settings = oauth_settings(emu)
    authorize(settings, str(tmp_path), code=emu.authorization_code())
    client = Bitrix24(OAuthAuth(settings, str(tmp_path)), timeout=2)
    emu.expire_access_tokens()
    real_grant = oauth.grant
    store = TokenStore(str(tmp_path))

    def racing_grant(url: str, params: Dict[str, str], timeout: float = 15.0) -> Dict[str, Any]:
        # Another writer (say, a second PBX on a shared folder) wins the race first.
        won = real_grant(url, dict(params))
        store.save(Tokens.from_grant(won, emu.client_endpoint))
        return real_grant(url, params)  # our own attempt: spent -> invalid_grant

    monkeypatch.setattr(oauth, "grant", racing_grant)
    assert client.call("scope")
    assert emu.refresh_count == 1 and emu.spent_refresh_uses == 1
    assert not store.load().refused


def test_token_errors_never_carry_secrets(emu, tmp_path):
    settings = oauth_settings(emu)
    tokens = authorize(settings, str(tmp_path), code=emu.authorization_code())
    emu.stop()  # the OAuth server is gone
    with pytest.raises(NetworkError) as info:
        authorize(settings, str(tmp_path), refresh_token=tokens.refresh_token)
    text = str(info.value) + repr(info.value.__cause__) + repr(info.value.__context__)
    assert tokens.refresh_token not in text and emu.client_secret not in text
    assert "cannot be reached" in str(info.value)
    assert TokenStore(str(tmp_path)).load().refresh_token == tokens.refresh_token  # store untouched
