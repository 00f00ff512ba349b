"""The OAuth token pair in the shared store: one chain for every PBX of the portal.

Bitrix24's refresh token is single-use (Bitrix24 REST docs: OAuth 2.0, token renewal), so two
PBXs refreshing on their own lock each other out at the first expiry. Here the refresh runs under
a PostgreSQL advisory lock (PostgreSQL docs: advisory locks) that every host takes; under it the
pair is read again, and a pair another host renewed meanwhile is used instead of refreshing. The
new pair is committed to the shared store before anybody uses it. A process-mode step refreshes in
a detached child that may outlive the step (and its lock): a `refreshing_until` mark, set under the
lock, keeps the others waiting for that child rather than spending the chain a second time.

oauth-tokens.json in state_dir stays as this PBX's copy: it is written with every pair (room
reserved first, as before) and read while the shared store is away; no refresh happens then.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator, Optional

import psycopg

from agi_bitrix.bitrix.oauth import (LOCK_POLL, REFRESH_TIMEOUT, TOKEN_METHOD, Tokens, TokenStore, TokenStoreError,
                                     _LockTimeout, _Room)
from agi_bitrix.bitrix.errors import AuthError
from agi_bitrix.shared.connect import SharedStoreError, connect, friendly

IN_FLIGHT = REFRESH_TIMEOUT + 5.0  # a detached refresh is given up after this


class SharedTokenStore(TokenStore):
    def __init__(self, state_dir: str, url: str, pbx: str, portal: str, timeout: float) -> None:
        super().__init__(state_dir)
        self.url, self.pbx, self.portal, self.timeout = url, pbx, portal, timeout
        self.lock_key = zlib.crc32(f"agi-bitrix oauth {portal}".encode())
        self._conn: Any = None
        self._pid = 0
        self.problem = ""  # why the shared store could not be used last time
        self.failed_at = float("-inf")  # when (time.monotonic) it could not be read
        self.label = f"the shared store (this PBX's copy: {self.path})"
        self.unshared = self.folder / "oauth-tokens.unshared"  # the copy holds a pair the store missed

    def _db(self) -> Any:
        # A connection never crosses a fork (a TLS session cannot be shared): a child opens its own.
        if self._conn is None or self._conn.closed or self._pid != os.getpid():
            self._conn = connect(self.url, self.pbx, self.timeout)
            self._pid = os.getpid()
        return self._conn

    def load(self) -> Optional[Tokens]:
        try:
            row = self._db().execute("SELECT pair FROM tokens WHERE portal = %s", (self.portal,)).fetchone()
        except (psycopg.Error, SharedStoreError) as exc:
            self.problem = str(exc) if isinstance(exc, SharedStoreError) else friendly(exc, self.url)
            self._conn = None
            self.failed_at = time.monotonic()  # a call step then runs on its journal without asking again
            return super().load()  # this PBX's copy; it is never refreshed while the store is away
        self.problem = ""
        if row is None:
            local = _quiet(super().load)
            if local is not None:  # the first PBX on the shared store brings its pair along
                self._share(local)
            return local
        if self.unshared.exists() and (local := _quiet(super().load)) is not None:
            # Renewed here when the shared store could not take it (it failed right after the
            # OAuth server answered): the shared store learns that pair now. Only then: the
            # PBXs' clocks cannot say which of two pairs is newer. (This PBX's copy is read only
            # in these two cases: a call step's load is one query otherwise.)
            if self._share(local):
                self.unshared.unlink(missing_ok=True)
            return local
        try:
            return Tokens.from_dict(json.loads(row["pair"]))
        except (ValueError, TypeError):
            raise TokenStoreError("the token pair in the shared store is damaged: run agi-bitrix auth "
                                  "--code") from None

    def _put(self, tokens: Tokens) -> None:
        if tokens.refused:
            # The refused pair is marked only where it is still the one stored: a pair another PBX
            # handed over meanwhile (renewed while the store failed) is not lost to the mark.
            self._db().execute(
                "UPDATE tokens SET pair = %s, updated_at = %s, refreshing_until = NULL WHERE portal = %s"
                " AND pair::json->>'refresh_token' = %s",
                (json.dumps(asdict(tokens)), time.time(), self.portal, tokens.refresh_token))
            return
        self._db().execute(
            "INSERT INTO tokens (portal, pair, updated_at) VALUES (%s, %s, %s) ON CONFLICT (portal) DO UPDATE"
            " SET pair = EXCLUDED.pair, updated_at = EXCLUDED.updated_at, refreshing_until = NULL",
            (self.portal, json.dumps(asdict(tokens)), time.time()))

    def _share(self, tokens: Tokens) -> bool:
        """This PBX's pair into the shared store; False (the reason in `problem`) when it failed."""
        try:
            self._put(tokens)
            return True
        except psycopg.Error as exc:
            self.problem = friendly(exc, self.url)
            self._conn = None
            return False

    def save(self, tokens: Tokens, room: Optional[_Room] = None) -> None:
        """This PBX's copy first (its room was reserved), then the shared store: committed before
        the pair is used. If the shared store fails now, the copy reaches it at the next load
        (a mark file says so)."""
        super().save(tokens, room)
        try:
            self._put(tokens)
        except (psycopg.Error, SharedStoreError) as exc:
            self._conn = None
            self.unshared.touch()
            raise AuthError("TOKEN_STORE", f"the renewed tokens are kept in {self.path} but not in the shared "
                            f"store ({exc}); they move there when it is back", None, TOKEN_METHOD) from None

    @contextmanager
    def reserve(self) -> Iterator[_Room]:
        """Room for the pair, and the in-flight mark under the lock (a detached child owns both)."""
        with super().reserve() as room:
            self._flight(time.time() + IN_FLIGHT)
            discard = room.discard

            def discard_and_land() -> None:  # a refresh that stored nothing (in a child too) lifts the mark
                landed = room.used
                discard()
                if not landed:
                    self._flight(None)

            room.discard = discard_and_land  # type: ignore[method-assign]
            yield room

    def _flight(self, until: Optional[float]) -> None:
        try:
            self._db().execute("UPDATE tokens SET refreshing_until = %s WHERE portal = %s", (until, self.portal))
        except (psycopg.Error, SharedStoreError):
            self._conn = None

    @contextmanager
    def locked(self, wait: float) -> Iterator[None]:
        """The refresh lock of every PBX; _LockTimeout after `wait`. Refused outright while the
        shared store is away: a refresh without it could spend the chain another PBX holds."""
        try:
            conn = connect(self.url, self.pbx, max(self.timeout, 1.0))
        except SharedStoreError as exc:
            raise AuthError("TOKEN_STORE", f"the token is not renewed while the shared store is away ({exc})",
                            None, TOKEN_METHOD) from None
        try:
            end = time.monotonic() + wait
            while True:
                try:
                    got = conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (self.lock_key,)).fetchone()["ok"]
                    if got:
                        row = conn.execute("SELECT refreshing_until FROM tokens WHERE portal = %s",
                                           (self.portal,)).fetchone()
                        if row is None or not row["refreshing_until"] or row["refreshing_until"] < time.time():
                            break
                        conn.execute("SELECT pg_advisory_unlock(%s)", (self.lock_key,))  # a child renews it
                except psycopg.Error as exc:
                    raise AuthError("TOKEN_STORE", friendly(exc, self.url), None, TOKEN_METHOD) from None
                if time.monotonic() >= end:
                    raise _LockTimeout()
                time.sleep(LOCK_POLL * 5)
            yield
        finally:
            conn.close()  # the session lock ends with the connection


def _quiet(fn: Any) -> Any:
    try:
        return fn()
    except TokenStoreError:
        return None
