"""The portal's request budget as one bucket for every PBX (Bitrix24 counts a portal's requests
in one leaky bucket, Bitrix24 REST docs: limits): the state ratelimit.py keeps in a file, kept in
one row of the shared store instead, read and written under a row lock.

While the shared store is away each PBX falls back on its own file with its share of the budget:
the burst and the rate divided by the number of PBXs its deliverer last saw alive, so that
together they stay inside the portal's. The portal's bucket may be full when the shared one is
lost, so a PBX starts an outage with its share full: until it drains, the PBXs together send no
faster than the portal drains."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple

import psycopg

from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.shared.connect import SharedStoreError, connect

PBXS = "pbxs"       # in this PBX's file: the PBXs its deliverer last saw alive
AWAY = "away_at"    # in this PBX's file: its last request while the shared store was away
RETRY = 10.0        # seconds a limiter whose PostgreSQL failed draws on the file before it asks again


class SharedRateLimiter(RateLimiter):
    def __init__(self, url: str, pbx: str, timeout: float, state_dir: str, portal: str, burst: int = 40,
                 per_second: float = 2.0, **kw: Any) -> None:
        super().__init__(state_dir, portal, burst, per_second, **kw)
        self.url, self.pbx, self.portal, self.timeout = url, pbx, portal, timeout
        self._conn: Any = None
        self._pid = 0
        self._down_at = float("-inf")  # when PostgreSQL last failed this limiter

    def borrow(self, conn: Any) -> None:
        """Use the call step's own connection to the shared store (one connection per step, not two)."""
        self._conn, self._pid = conn, os.getpid()

    def _db(self) -> Any:
        if self._conn is None or self._conn.closed or self._pid != os.getpid():
            self._conn = connect(self.url, self.pbx, self.timeout)
            self._pid = os.getpid()
        return self._conn

    def store_away(self, problem: str) -> None:
        """The step found the shared store away: its requests draw on this PBX's file without
        trying PostgreSQL again (a server that does not answer costs a connect timeout each time)."""
        self._conn, self._down_at, self.problem = None, self.clock(), f"shared request budget: {problem}"

    @contextmanager
    def _state(self) -> Iterator[Optional[Dict[str, Any]]]:
        row = tx = None
        if self._conn is not None or self.clock() - self._down_at >= RETRY:
            try:
                conn = self._db()
                tx = conn.transaction()
                tx.__enter__()
                row = conn.execute("SELECT state FROM budgets WHERE portal = %s FOR UPDATE",
                                   (self.portal,)).fetchone()
                if row is None:
                    conn.execute("INSERT INTO budgets (portal) VALUES (%s) ON CONFLICT DO NOTHING", (self.portal,))
                    row = conn.execute("SELECT state FROM budgets WHERE portal = %s FOR UPDATE",
                                       (self.portal,)).fetchone()
            except (psycopg.Error, SharedStoreError) as exc:
                if tx is not None:
                    _end(tx, exc)  # a borrowed connection goes back to its step out of the transaction
                self.store_away(str(exc))
                row = None
        if row is None:
            with super()._state() as state:  # this PBX's own file until the shared store is back
                if state is not None:
                    self._away(state)
                yield state
            return
        try:
            state = json.loads(row["state"] or "{}")
        except ValueError:
            state = {}
        before = json.dumps(state, sort_keys=True)
        try:
            yield state
            after = json.dumps(state, sort_keys=True)
            if after != before:
                conn.execute("UPDATE budgets SET state = %s WHERE portal = %s", (after, self.portal))
        except BaseException as exc:
            _end(tx, exc)
            raise
        _end(tx, None)

    def _limits(self, state: Dict[str, Any]) -> Tuple[int, float]:
        share = int(state.get(PBXS) or 1)  # only this PBX's own file holds it
        return max(1, self.burst // share), self.rate / share

    def _away(self, state: Dict[str, Any]) -> None:
        """This PBX's file stands in for the shared bucket: a request after a quiet spell as long as
        its bucket takes to drain begins an outage, with the share full."""
        now = self.clock()
        burst, rate = self._limits(state)
        if now - float(state.get(AWAY) or 0.0) > burst / rate:
            self._fill(state, now)
        state[AWAY] = now

    def note_pbxs(self, count: int) -> None:
        """The deliverer saw `count` PBXs alive (itself too): this PBX's share while the shared store
        is away."""
        with RateLimiter._state(self) as state:
            if state is not None:
                state[PBXS] = max(1, int(count))


def _end(tx: Any, exc: Optional[BaseException]) -> None:
    try:
        tx.__exit__(type(exc) if exc else None, exc, None)
    except psycopg.Error:
        pass  # the slot is lost, not the request
