"""Local state in SQLite under `state_dir`: call state by linkedid and a cache of employees.

Every AGI process opens the database, does a few short transactions and exits; WAL mode lets
many of them read and write at once, and `BEGIN IMMEDIATE` makes the claims atomic.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional
from contextlib import contextmanager

DB_NAME = "agi-bitrix.sqlite3"
USER_CACHE_SECONDS = 3600
KEEP_CALLS_SECONDS = 7 * 24 * 3600  # finished calls are kept a week for troubleshooting

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    linkedid        TEXT PRIMARY KEY,
    direction       TEXT NOT NULL,             -- incoming | outgoing
    phone           TEXT NOT NULL,             -- client number as registered
    line            TEXT NOT NULL DEFAULT '',
    user_inner      TEXT NOT NULL,             -- employee the call was registered for
    call_id         TEXT,                      -- Bitrix24 CALL_ID once known
    shown           TEXT NOT NULL DEFAULT '[]',-- inner numbers whose card is up
    answered_inner  TEXT,
    answered_at     REAL,
    started_at      REAL NOT NULL,
    finish_claimed  REAL,                      -- one hangup owns the finish
    finished_at     REAL,
    status_code     TEXT,
    duration        INTEGER
);
CREATE INDEX IF NOT EXISTS calls_started ON calls (started_at);
CREATE TABLE IF NOT EXISTS users (
    inner       TEXT PRIMARY KEY,
    user_id     INTEGER NOT NULL,
    fetched_at  REAL NOT NULL
);
"""


class StoreError(Exception):
    """The state directory or database is unusable; the message says what to fix."""


@dataclass
class Call:
    linkedid: str
    direction: str
    phone: str
    line: str
    user_inner: str
    call_id: Optional[str]
    shown: List[str]
    answered_inner: Optional[str]
    answered_at: Optional[float]
    started_at: float
    finish_claimed: Optional[float]
    finished_at: Optional[float]
    status_code: Optional[str]
    duration: Optional[int]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Call":
        data = dict(row)
        data["shown"] = json.loads(data["shown"] or "[]")
        return cls(**data)


class Store:
    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / DB_NAME
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=10, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 10000")
            if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"state database {self.path} is unusable: {exc}") from None
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- calls ---------------------------------------------------------------------------------
    def call(self, linkedid: str) -> Optional[Call]:
        row = self.db.execute("SELECT * FROM calls WHERE linkedid = ?", (linkedid,)).fetchone()
        return Call.from_row(row) if row else None

    def start_call(self, linkedid: str, direction: str, phone: str, line: str, user_inner: str,
                   started_at: Optional[float] = None) -> Call:
        """Record a new call; a second start for the same linkedid keeps the first."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO calls (linkedid, direction, phone, line, user_inner, shown, started_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (linkedid, direction, phone, line, user_inner, json.dumps([user_inner]),
                 started_at or time.time()))
        call = self.call(linkedid)
        assert call is not None
        return call

    def set_call_id(self, linkedid: str, call_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE calls SET call_id = ? WHERE linkedid = ?", (call_id, linkedid))

    def mark_answered(self, linkedid: str, inner: Optional[str], at: Optional[float] = None) -> Optional[Call]:
        """The first answer of a call wins; returns the call as it was before this answer."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM calls WHERE linkedid = ?", (linkedid,)).fetchone()
            if row is None:
                return None
            before = Call.from_row(row)
            if before.answered_at is None:
                db.execute("UPDATE calls SET answered_inner = ?, answered_at = ? WHERE linkedid = ?",
                           (inner, at or time.time(), linkedid))
            return before

    def set_shown(self, linkedid: str, shown: List[str]) -> None:
        with self._tx() as db:
            db.execute("UPDATE calls SET shown = ? WHERE linkedid = ?", (json.dumps(shown), linkedid))

    def claim_finish(self, linkedid: str) -> bool:
        """Exactly one hangup event finishes a call."""
        with self._tx() as db:
            cur = db.execute("UPDATE calls SET finish_claimed = ? WHERE linkedid = ?"
                             " AND finish_claimed IS NULL AND finished_at IS NULL", (time.time(), linkedid))
            return cur.rowcount == 1

    def release_finish(self, linkedid: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE calls SET finish_claimed = NULL WHERE linkedid = ? AND finished_at IS NULL",
                       (linkedid,))

    def mark_finished(self, linkedid: str, status_code: str, duration: int) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE calls SET finished_at = ?, status_code = ?, duration = ? WHERE linkedid = ?",
                       (now, status_code, duration, linkedid))
            db.execute("DELETE FROM calls WHERE started_at < ? AND finished_at IS NOT NULL",
                       (now - KEEP_CALLS_SECONDS,))

    # -- employees -----------------------------------------------------------------------------
    def user_id(self, inner: str, max_age: float = USER_CACHE_SECONDS) -> Optional[int]:
        row = self.db.execute("SELECT user_id, fetched_at FROM users WHERE inner = ?", (inner,)).fetchone()
        if row and time.time() - row["fetched_at"] < max_age:
            return int(row["user_id"])
        return None

    def remember_user(self, inner: str, user_id: int) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO users (inner, user_id, fetched_at) VALUES (?, ?, ?)",
                       (inner, int(user_id), time.time()))

    def counts(self) -> Dict[str, Any]:
        row = self.db.execute(
            "SELECT COUNT(*) AS calls, SUM(finished_at IS NOT NULL) AS finished FROM calls").fetchone()
        return dict(row)
