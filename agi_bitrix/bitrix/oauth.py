"""Mode 2: a Bitrix24 local application (OAuth 2.0) whose token pair every process on the PBX shares.

A refresh token is single-use: each refresh returns a new pair and kills the old one (Bitrix24
REST docs: OAuth 2.0 authorization, token renewal). Asterisk runs one process per call step, so
dozens may see `expired_token` in the same second, and one careless refresh locks the integration out until an administrator re-authorizes.
So:

- the pair lives in state_dir/oauth-tokens.json, mode 0600, replaced atomically (temp file, fsync,
  rename), so a reader sees the old pair or the new one, never half of each;
- a refresh happens only on 401 expired_token, never on a timer, and only under an exclusive
  flock of oauth-tokens.lock;
- under the lock the store is read again: an access token other than the refused one means somebody
  refreshed meanwhile, and the call is retried with it instead;
- room for the new pair is reserved on disk before it is asked for (a full disk never costs the
  chain); the new pair is on disk before anybody uses it; a refresh token the OAuth server refused
  is marked in the store and never sent again;
- inside `agi-bitrix service` (many steps, one process, threads) the refresh is single-flight: one
  refresh thread, every step that saw the token expire waits for it within its own budget.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Tuple
from urllib.parse import urlsplit

from agi_bitrix.bitrix.errors import (AuthError, BitrixError, ExpiredToken, NetworkError, PortalError, classify,
                                      connection_failure)
from agi_bitrix.bitrix.http import Failure, Pool, json_body
from agi_bitrix.deadline import Deadline
from agi_bitrix.ownership import match_owner, open_private

if TYPE_CHECKING:
    from agi_bitrix.settings import Bitrix24Settings

TOKENS_FILE = "oauth-tokens.json"
LOCK_FILE = "oauth-tokens.lock"
# The token request is never cut short by a caller's time budget: an answer lost after the server
# rotated the pair would lose the chain. On the call path it runs in a detached child that
# finishes (and stores the pair) on its own, while the caller waits only for the budget.
REFRESH_TIMEOUT = 15.0
LOCK_WAIT = REFRESH_TIMEOUT + 5.0
LOCK_POLL = 0.02
TOKEN_METHOD = "oauth.token"

SPENT = ("the application was revoked or its refresh token is spent: "
         "run agi-bitrix auth --code (or --refresh-token -) again")
BAD_CODE = ("the authorization code is wrong, used or older than 30 seconds: open the authorization "
            "link again and run agi-bitrix auth --code at once")
BAD_CLIENT = ("the OAuth server refused client_id/client_secret (or the application is not installed): "
              "copy them again from the application's page in Bitrix24 into [bitrix24]")
NO_TOKENS = "no OAuth tokens yet: run agi-bitrix auth --code"


class TokenStoreError(Exception):
    """No tokens stored yet, or the store cannot be read; the message says what to do."""


class _LockTimeout(Exception):
    pass


RESERVE_BYTES = 8192  # a pair takes about 1 KiB; the rest is room for longer tokens and endpoints


class _Room:
    """A reserved temp file for the next token pair."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path, self.used = fd, path, False

    def discard(self) -> None:
        os.close(self.fd)
        if not self.used:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _write_all(fd: int, data: bytes, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


@dataclass
class Tokens:
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires: float
    client_endpoint: str
    server_endpoint: str = ""
    member_id: str = ""
    scope: str = ""
    domain: str = ""
    obtained_at: float = 0.0
    refused: str = ""  # set when the OAuth server refused refresh_token for good
    application_token: str = field(default="", repr=False)  # from the install callback: events carry it

    @classmethod
    def from_grant(cls, body: Dict[str, Any], fallback_endpoint: str) -> "Tokens":
        """Validate a token endpoint answer (code exchange or refresh)."""
        from agi_bitrix.settings import checked_url  # a refresh is rare: pydantic only then

        access, refresh = body.get("access_token"), body.get("refresh_token")
        if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
            raise PortalError("BAD_TOKEN_ANSWER", "the OAuth server answered without a token pair", 200, TOKEN_METHOD)
        try:
            client_endpoint = checked_url(str(body.get("client_endpoint") or fallback_endpoint))
            server_endpoint = checked_url(str(body.get("server_endpoint") or ""))
        except ValueError as exc:
            raise PortalError("BAD_TOKEN_ANSWER", f"endpoint in the OAuth answer {exc}", 200, TOKEN_METHOD) from None
        now = time.time()
        expires = body.get("expires")
        if not isinstance(expires, (int, float)) or isinstance(expires, bool):
            expires = now + _number(body.get("expires_in"), 3600)
        return cls(access_token=access, refresh_token=refresh, expires=float(expires),
                   client_endpoint=client_endpoint, server_endpoint=server_endpoint,
                   member_id=str(body.get("member_id") or ""), scope=str(body.get("scope") or ""),
                   domain=str(body.get("domain") or ""), obtained_at=now)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Tokens":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        tokens = cls(**known)
        if not (tokens.access_token and tokens.refresh_token and tokens.client_endpoint):
            raise ValueError("incomplete")
        return tokens

    def scopes(self) -> Tuple[str, ...]:
        return tuple(s.strip() for s in self.scope.split(",") if s.strip())


def _number(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def token_url(server_endpoint: str, default: str) -> str:
    """`<OAuth host>/oauth/token/`, the host taken from server_endpoint once known (Bitrix24 OAuth docs)."""
    if server_endpoint:
        parts = urlsplit(server_endpoint)
        return f"{parts.scheme}://{parts.netloc}/oauth/token/"
    return default


class TokenStore:
    """The token pair in state_dir, shared by every process on the PBX."""

    def __init__(self, state_dir: str) -> None:
        self.folder = Path(state_dir)
        self.path = self.folder / TOKENS_FILE
        self.lock_path = self.folder / LOCK_FILE

    def load(self) -> Optional[Tokens]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenStoreError(f"cannot read {self.path} ({exc.strerror}): it must belong to the user "
                                  "Asterisk runs as") from None
        try:
            return Tokens.from_dict(json.loads(raw))
        except (ValueError, TypeError):
            raise TokenStoreError(f"{self.path} is damaged: run agi-bitrix auth --code again") from None

    @contextmanager
    def reserve(self) -> Iterator["_Room"]:
        """Room on disk for the next pair, taken before asking for it: the OAuth server kills the
        old pair when it issues a new one, so a new pair that cannot be stored is a lost chain.

        The room is a temp file of RESERVE_BYTES written now; `save` rewrites it in place (no new
        disk blocks needed) and renames it over the store. Left unused, it is removed.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".oauth-tokens.", dir=self.folder)  # created 0600
        except OSError as exc:
            raise AuthError("TOKEN_STORE", f"{self.folder} is not writable ({exc.strerror}): it must belong "
                            "to the user Asterisk runs as", None, TOKEN_METHOD) from None
        room = _Room(fd, tmp)
        try:
            try:
                match_owner(fd, self.folder)
                _write_all(fd, b" " * RESERVE_BYTES, 0)
                os.fsync(fd)
            except OSError as exc:
                raise AuthError("TOKEN_STORE", f"no room in {self.folder} to keep a renewed token pair "
                                f"({exc.strerror}), so none was asked for: free the disk (the current pair "
                                "stays valid)", None, TOKEN_METHOD) from None
            yield room
        finally:
            room.discard()

    def save(self, tokens: Tokens, room: Optional["_Room"] = None) -> None:
        """Write the pair into the reserved room (padded with blanks, valid JSON) and rename it over
        the store, so a reader sees the old pair or the new one, never half of each."""
        if room is None:
            with self.reserve() as own:
                return self.save(tokens, own)
        data = json.dumps(asdict(tokens), indent=1).encode("utf-8")
        _write_all(room.fd, data.ljust(RESERVE_BYTES), 0)
        os.fsync(room.fd)
        os.replace(room.path, self.path)
        room.used = True
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power cut
        finally:
            os.close(dir_fd)

    @contextmanager
    def locked(self, wait: float) -> Iterator[None]:
        """The PBX-wide refresh lock; _LockTimeout after `wait` seconds."""
        try:
            fd = open_private(self.lock_path)
        except OSError as exc:
            raise AuthError("TOKEN_STORE", f"cannot open {self.lock_path} ({exc.strerror})", None,
                            TOKEN_METHOD) from None
        try:
            end = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= end:
                        raise _LockTimeout() from None
                    time.sleep(LOCK_POLL)
            yield
        finally:
            os.close(fd)


def token_store(settings: Any) -> TokenStore:
    """Where the pair lives: oauth-tokens.json in state_dir, or the store several PBXs share
    (`[storage] url`, shared/tokens.py), whose refresh lock every PBX takes."""
    storage = settings.storage
    if not storage.url:
        return TokenStore(storage.state_dir)
    from agi_bitrix.shared.tokens import SharedTokenStore

    return SharedTokenStore(storage.state_dir, storage.url, storage.pbx_id,
                            urlsplit(settings.bitrix24.portal_url).netloc, storage.db_timeout)


def grant(url: str, params: Dict[str, str], timeout: float = REFRESH_TIMEOUT) -> Dict[str, Any]:
    """One request to the OAuth token endpoint (GET, as Bitrix24's OAuth docs show).

    The URL carries client_secret and a token: no message built here ever contains it, so
    errors name only the host and what went wrong.
    """
    host = urlsplit(url).netloc
    failure: Optional[NetworkError] = None
    try:
        resp = Pool(1).request("GET", url, timeout, fields=params)  # a refresh is rare: no pool kept
    except Failure as exc:
        if exc.timed_out:
            failure = NetworkError("TIMEOUT", f"the OAuth server {host} did not answer within {timeout:.0f} s",
                                   None, TOKEN_METHOD)
        else:
            cause, text = connection_failure(exc.error, url)
            failure = NetworkError("UNREACHABLE", f"the OAuth server cannot be reached: {text}", None,
                                   TOKEN_METHOD, cause=cause)
    if failure is not None:
        raise failure  # outside the handler: the library's error (its URL) is not even chained
    body = json_body(resp)
    if not isinstance(body, dict):
        raise classify(resp.status if resp.status >= 400 else 502, f"HTTP_{resp.status}",
                       f"the answer of {host} is not JSON", TOKEN_METHOD)
    if "error" in body or resp.status >= 400:
        code = str(body.get("error", ""))
        if code.lower() == "invalid_grant":
            text = BAD_CODE if params.get("grant_type") == "authorization_code" else SPENT
            raise AuthError(code, text, resp.status, TOKEN_METHOD)
        if code.lower() == "invalid_client":
            raise AuthError(code, BAD_CLIENT, resp.status, TOKEN_METHOD)
        raise classify(resp.status, code, str(body.get("error_description", ""))[:200], TOKEN_METHOD)
    return body



def _client_params(settings: Bitrix24Settings, grant_type: str) -> Dict[str, str]:
    return {"grant_type": grant_type, "client_id": settings.client_id, "client_secret": settings.client_secret}


class OAuthAuth:
    mode = "oauth"

    def __init__(self, settings: Bitrix24Settings, state_dir: str, threaded: bool = False,
                 store: Optional[TokenStore] = None) -> None:
        self.settings = settings
        self.store = store if store is not None else TokenStore(state_dir)
        tokens = self.store.load()
        if tokens is None:
            raise TokenStoreError(NO_TOKENS)
        self.tokens = tokens
        self.refreshed = False  # this process renewed the pair (for `check`)
        # Shared by the threads of `agi-bitrix service`: refresh in a thread, never in a fork.
        self.threaded = threaded
        self._flight_lock = threading.Lock()
        self._flight: Optional[Future] = None
        self.on_refresh: Optional[Callable[[], None]] = None  # the service counts refreshes

    def credentials(self) -> Tuple[str, Dict[str, str]]:
        return self.tokens.client_endpoint, {"auth": self.tokens.access_token}

    def _reload(self) -> Tokens:
        try:
            tokens = self.store.load()
        except TokenStoreError as exc:
            raise AuthError("TOKEN_STORE", str(exc), None, TOKEN_METHOD) from None
        if tokens is None:
            raise AuthError("TOKEN_STORE", f"{self.store.path} was removed: {NO_TOKENS}", None, TOKEN_METHOD)
        return tokens

    def on_rejected(self, used: Dict[str, str], deadline: Optional[Deadline] = None) -> bool:
        """invalid_token: another process rotated the pair we read (no refresh here).

        The OAuth server kills the old pair before the refreshing process has stored the new one,
        so when the store still holds the refused token, wait for the refresh lock and look again.
        """
        latest = self._reload()
        if latest.access_token == used.get("auth"):
            try:
                with self.store.locked(self._lock_wait(deadline)):
                    latest = self._reload()
            except _LockTimeout:
                return False
        if latest.access_token != used.get("auth"):
            self.tokens = latest
            return True
        return False

    @staticmethod
    def _lock_wait(deadline: Optional[Deadline]) -> float:
        return min(LOCK_WAIT, deadline.remaining()) if deadline is not None else LOCK_WAIT

    def on_expired(self, used: Dict[str, str], deadline: Optional[Deadline] = None) -> bool:
        if self.threaded:
            return self._refresh_single_flight(used, deadline)
        try:
            with self.store.locked(self._lock_wait(deadline)):
                current = self._reload()
                if current.access_token != used.get("auth"):
                    self.tokens = current  # somebody refreshed while we waited: just retry
                    return True
                if current.refused:
                    raise AuthError("invalid_grant", SPENT, None, TOKEN_METHOD)
                with self.store.reserve() as room:
                    if deadline is not None and deadline.seconds is not None:
                        return self._refresh_detached(current, deadline, room)
                    self.tokens = self._refresh(current, room)
                self.refreshed = True
                return True
        except _LockTimeout:
            raise ExpiredToken("REFRESH_BUSY", "another process is renewing the OAuth token and has not "
                               "finished in time", None, TOKEN_METHOD) from None

    def _refresh_single_flight(self, used: Dict[str, str], deadline: Optional[Deadline]) -> bool:
        """The service's refresh: one thread at a time does it, every expired step waits for it.

        The thread holds the PBX-wide flock for the whole exchange, so process-mode steps running
        beside the service wait for it or reuse its pair. No fork: a child of a threaded process
        would inherit every live AGI socket. The thread is not a daemon, so a stopping service
        finishes the rotation (and stores the pair) before it exits.
        """
        with self._flight_lock:
            flight = self._flight
            if flight is None or flight.done():
                flight = self._flight = Future()
                threading.Thread(target=self._refresh_job, args=(used, flight), name="oauth-refresh").start()
        wait = LOCK_WAIT + REFRESH_TIMEOUT if deadline is None else max(0.0, deadline.remaining())
        try:
            return flight.result(timeout=wait)
        except FutureTimeout:
            raise ExpiredToken("REFRESH_PENDING", "the OAuth server is slow; the token is being renewed "
                               "in the background", None, TOKEN_METHOD) from None

    def _refresh_job(self, used: Dict[str, str], flight: Future) -> None:
        try:
            with self.store.locked(LOCK_WAIT):
                current = self._reload()
                if current.access_token != used.get("auth"):
                    self.tokens = current  # somebody refreshed meanwhile: just retry
                elif current.refused:
                    raise AuthError("invalid_grant", SPENT, None, TOKEN_METHOD)
                else:
                    with self.store.reserve() as room:
                        self.tokens = self._refresh(current, room)
                    self.refreshed = True
                    if self.on_refresh is not None:
                        self.on_refresh()
            flight.set_result(True)
        except _LockTimeout:
            flight.set_exception(ExpiredToken("REFRESH_BUSY", "another process is renewing the OAuth token and "
                                              "has not finished in time", None, TOKEN_METHOD))
        except BaseException as exc:  # handed to every waiting step
            flight.set_exception(exc)

    def _refresh_detached(self, current: Tokens, deadline: Deadline, room: "_Room") -> bool:
        """Refresh in a forked child so a slow OAuth server never holds the caller.

        The child inherits the lock (flock belongs to the shared open file), closes the AGI pipes
        at once (a child holding stdout would keep the call's dialplan waiting), refreshes, stores
        the pair and exits. The parent waits for it only while the budget lasts; if the budget
        runs out first the step is queued and the child still completes the rotation.
        """
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                self._refresh(current, room)
                code = 0
            except BaseException:
                pass
            finally:
                room.discard()
                os._exit(code)
        room.used = True  # the child owns the room now: the parent must never remove it
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline.remaining() <= 0.05:
                raise ExpiredToken("REFRESH_PENDING", "the OAuth server is slow; the token is being renewed "
                                   "in the background", None, TOKEN_METHOD)
            time.sleep(0.01)
        latest = self._reload()
        if latest.access_token == current.access_token:
            if latest.refused:
                raise AuthError("invalid_grant", SPENT, None, TOKEN_METHOD)
            raise AuthError("REFRESH_FAILED", "the OAuth token could not be renewed (see agi-bitrix check)",
                            None, TOKEN_METHOD)
        self.tokens = latest
        self.refreshed = True
        return True

    def _refresh(self, current: Tokens, room: "_Room") -> Tokens:
        """Exchange the refresh token (caller holds the lock and the room for the new pair); the
        new pair is stored before use."""
        params = _client_params(self.settings, "refresh_token")
        params["refresh_token"] = current.refresh_token
        try:
            body = grant(token_url(current.server_endpoint, self.settings.oauth_url), params)
        except AuthError as exc:
            if exc.code.lower() != "invalid_grant":
                raise
            latest = self._reload()
            if latest.refresh_token != current.refresh_token:
                return latest  # rotated concurrently by a writer outside this lock: use its pair
            self.store.save(replace(current, refused=f"{exc.code} at {time.strftime('%Y-%m-%d %H:%M:%S')}"),
                            room)
            raise
        tokens = replace(Tokens.from_grant(body, current.client_endpoint),
                         application_token=current.application_token)
        try:
            self.store.save(tokens, room)
        except OSError as exc:  # the room was reserved: a failing disk, not a full one
            raise AuthError("TOKEN_STORE", f"the renewed tokens could not be stored in {self.store.path} "
                            f"({exc.strerror}): run agi-bitrix auth again", None, TOKEN_METHOD) from None
        return tokens


def authorize(settings: Bitrix24Settings, state_dir: str, code: Optional[str] = None,
              refresh_token: Optional[str] = None, store: Optional[TokenStore] = None) -> Tokens:
    """`agi-bitrix auth`: exchange an authorization code or adopt a refresh token; store the pair."""
    store = store if store is not None else TokenStore(state_dir)
    try:
        with store.locked(LOCK_WAIT):
            try:
                previous = store.load()
            except TokenStoreError:
                previous = None  # a damaged store is what this command repairs
            if code:
                params = _client_params(settings, "authorization_code")
                params["code"] = code
            elif refresh_token:
                params = _client_params(settings, "refresh_token")
                params["refresh_token"] = refresh_token
            else:
                raise ValueError("authorize needs a code or a refresh token")
            url = token_url(previous.server_endpoint if previous else "", settings.oauth_url)
            with store.reserve() as room:
                tokens = Tokens.from_grant(grant(url, params), settings.portal_url + "rest/")
                if previous is not None:
                    tokens = replace(tokens, application_token=previous.application_token)
                store.save(tokens, room)
            return tokens
    except _LockTimeout:
        raise BitrixError("REFRESH_BUSY", "another process holds the token lock; try again", None,
                          TOKEN_METHOD) from None


def install(state_dir: str, tokens: Tokens, store: Optional[TokenStore] = None) -> None:
    """Store the pair and application_token of a proven installation callback (bitrix/install.py)."""
    store = store if store is not None else TokenStore(state_dir)
    try:
        with store.locked(LOCK_WAIT):
            store.save(tokens)
    except _LockTimeout:
        raise BitrixError("REFRESH_BUSY", "another process holds the token lock; try again", None,
                          TOKEN_METHOD) from None
