"""Local state in SQLite under `state_dir`: call state by linkedid, the outbox journal, employees.

Every AGI process opens the database, does a few short transactions and exits; WAL mode lets
many of them read and write at once, and `BEGIN IMMEDIATE` makes each step atomic. What must
reach Bitrix24 is written to the outbox *before* it is sent, and marked done only after the
portal answered, so a process killed at any instant loses nothing.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from agi_bitrix.ownership import match_owner_quietly

DB_NAME = "agi-bitrix.sqlite3"
USER_CACHE_SECONDS = 3600
LEASE_SLACK = 1.0  # a lease held for at most this much less than asked is not renewed
KEEP_SECONDS = 7 * 24 * 3600  # finished calls and delivered entries are kept a week for troubleshooting

PENDING, DONE, DEAD = "pending", "done", "dead"
REPEAT_HARMS = ("finish", "rest")  # entry kinds whose second delivery is not the same as one
# Entry kinds (outbox.py has a _deliver_<kind> for each): register, card, finish, record, and
# `rest`, any other method call that belongs to the call (the dialer's task comments, deadlines,
# notifications). Inside one call they are delivered in creation order.

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
    finish_claimed  REAL,                      -- the one hangup that queued the finish
    finished_at     REAL,
    status_code     TEXT,
    duration        INTEGER,
    card_live       INTEGER NOT NULL DEFAULT 1, -- 0: registered after it ended, nobody has a card
    crm_type        TEXT,                      -- the client the portal bound the call to
    crm_id          INTEGER,
    active_part     TEXT                       -- after a transfer: the key of the part now going on
);
CREATE INDEX IF NOT EXISTS calls_started ON calls (started_at);
CREATE INDEX IF NOT EXISTS calls_open ON calls (started_at) WHERE finish_claimed IS NULL;
CREATE TABLE IF NOT EXISTS users (
    inner       TEXT PRIMARY KEY,
    user_id     INTEGER NOT NULL,
    fetched_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS routes (
    phone       TEXT PRIMARY KEY,          -- client number
    inner       TEXT NOT NULL,             -- his manager's inner number, '' = none
    fetched_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    linkedid     TEXT NOT NULL,
    kind         TEXT NOT NULL,                -- register | card | finish | record
    payload      TEXT NOT NULL,                -- JSON
    state        TEXT NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_try     REAL NOT NULL,
    created_at   REAL NOT NULL,
    done_at      REAL,
    last_error   TEXT,
    sending_at   REAL,                         -- set while a request is in flight: its outcome is unknown
    lease_owner  TEXT,
    lease_until  REAL
);
CREATE TABLE IF NOT EXISTS replayed (
    uid         TEXT PRIMARY KEY,             -- an entry brought back by `outbox replay`, once
    at          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_try);
CREATE INDEX IF NOT EXISTS outbox_call ON outbox (linkedid, id);
"""


# Versioned migrations of the SQLite schema (PRAGMA user_version). Version 1: the columns earlier
# releases added to `calls` and `outbox` without a migration, for databases they created.
SQLITE_SCHEMA = 1
_ADDED_COLUMNS = {
    "calls": [("finish_claimed", "REAL"), ("card_live", "INTEGER NOT NULL DEFAULT 1"), ("crm_type", "TEXT"),
              ("crm_id", "INTEGER"), ("active_part", "TEXT")],
    "outbox": [("sending_at", "REAL"), ("lease_owner", "TEXT"), ("lease_until", "REAL")],
}


def migrate_sqlite(db: sqlite3.Connection, path: Path) -> int:
    """Bring the database at `path` to SQLITE_SCHEMA; its version before. StoreError when it is
    newer than this code."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > SQLITE_SCHEMA:
        raise StoreError(f"state database {path} has schema version {found}, newer than this agi-bitrix "
                         f"({SQLITE_SCHEMA}): upgrade agi-bitrix")
    if found < 1:
        db.execute("BEGIN IMMEDIATE")
        try:
            for table, columns in _ADDED_COLUMNS.items():
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns if have else []:  # a new database gets them from _SCHEMA
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            db.execute(f"PRAGMA user_version = {SQLITE_SCHEMA}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return found


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
    card_live: int = 1
    crm_type: Optional[str] = None
    crm_id: Optional[int] = None
    active_part: Optional[str] = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Call":
        data = dict(row)
        data["shown"] = json.loads(data["shown"] or "[]")
        return cls(**data)


@dataclass
class Entry:
    id: int
    linkedid: str
    kind: str
    payload: Dict[str, Any]
    state: str
    attempts: int
    next_try: float
    created_at: float
    last_error: Optional[str]
    sending_at: Optional[float]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Entry":
        return cls(id=row["id"], linkedid=row["linkedid"], kind=row["kind"], payload=json.loads(row["payload"]),
                   state=row["state"], attempts=row["attempts"], next_try=row["next_try"],
                   created_at=row["created_at"], last_error=row["last_error"], sending_at=row["sending_at"])


def _friendly(exc: BaseException, path: Path) -> str:
    text = str(exc)
    if "disk is full" in text or getattr(exc, "errno", None) == 28:
        return f"state database {path}: the disk is full"
    return f"state database {path} is unusable: {text}"


class Store:
    def __init__(self, state_dir: str, pooled: bool = False, write_lock: Any = None) -> None:
        """`pooled`: the connection is handed from thread to thread (one step at a time uses it),
        as `agi-bitrix service` does to save opening the database on every call step.

        `write_lock`: what the threads of one process sharing this database queue on before a write
        transaction. SQLite lets one writer in at a time and makes the others poll with growing
        sleeps (SQLite docs: sqlite3_busy_timeout); a hundred threads polling lose turns to each
        other for seconds, while a queue on a lock hands the turn on as soon as it is free. Other
        processes still wait through the busy timeout."""
        self.write_lock = write_lock if write_lock is not None else nullcontext()
        self.path = Path(state_dir) / DB_NAME
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=10, isolation_level=None,
                                      check_same_thread=not pooled)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 10000")
            if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.db.execute("PRAGMA journal_mode = WAL")
            # FULL: a call record acknowledged to Asterisk survives a power cut, not only a crash.
            self.db.execute("PRAGMA synchronous = FULL")
            self._synchronous = "FULL"
            self.schema_before = migrate_sqlite(self.db, self.path)  # first: _SCHEMA's indexes name its columns
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(_friendly(exc, self.path)) from None
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass
        # Made by root (an administrator's command): the Asterisk user's steps must still write them.
        match_owner_quietly([self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")], self.path.parent)

    @classmethod
    def in_memory(cls) -> "Store":
        """A private store in memory, for a call step whose state_dir cannot be written."""
        store = cls.__new__(cls)
        store.path = Path(":memory:")
        store.write_lock = nullcontext()
        store._synchronous = ""
        store.db = sqlite3.connect("file::memory:", uri=True, isolation_level=None)
        store.db.row_factory = sqlite3.Row
        store.db.executescript(_SCHEMA)
        return store

    def copy_call(self, path: Path, linkedid: str) -> List[int]:
        """Copy one call (and its transfer part now going on), its waiting entries and the caches
        from the database at `path`, read only. Returns the ids of the entries copied.

        Raises sqlite3.Error when that database cannot even be read. `immutable` (no WAL, no
        locks) is the last resort for a folder where not even SQLite's shared memory file can be made.
        """
        from urllib.parse import quote

        if not path.exists():
            return []
        failure: Optional[sqlite3.Error] = None
        for mode in ("mode=ro", "immutable=1"):
            try:
                self.db.execute("ATTACH DATABASE ? AS disk", (f"file:{quote(str(path))}?{mode}",))
            except sqlite3.Error as exc:
                failure = exc
                continue
            try:
                return self._copy_from_disk(linkedid)
            except sqlite3.Error as exc:
                failure = exc
            finally:
                self.db.execute("DETACH DATABASE disk")
        raise failure or sqlite3.OperationalError("unreadable")

    def _copy_from_disk(self, linkedid: str) -> List[int]:
        db = self.db
        db.execute("BEGIN")
        try:
            keys = [linkedid] + [r[0] for r in db.execute(
                "SELECT active_part FROM disk.calls WHERE linkedid = ? AND active_part IS NOT NULL", (linkedid,))]
            marks = ",".join("?" * len(keys))
            db.execute(f"INSERT INTO calls SELECT * FROM disk.calls WHERE linkedid IN ({marks})", keys)
            db.execute(f"INSERT INTO outbox SELECT * FROM disk.outbox WHERE linkedid IN ({marks}) AND state = ?",
                       keys + [PENDING])
            db.execute("INSERT INTO users SELECT * FROM disk.users")
            db.execute("INSERT INTO routes SELECT * FROM disk.routes")
            # Leases are the disk's business: whoever held them cannot write there either.
            db.execute("UPDATE outbox SET lease_owner = NULL, lease_until = NULL")
            ids = [r[0] for r in db.execute("SELECT id FROM outbox")]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return ids

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. `durable=False` for bookkeeping that may be redone (leases, marks
        of delivery, caches): its commit skips the fsync (synchronous NORMAL, SQLite docs "WAL
        mode"). A process crash still cannot lose it; a power cut may, until the next durable
        commit, which makes the whole WAL durable in order. A lost mark only means a repeat, which
        the portal answers the same way (register by EXTERNAL_CALL_ID, finish after `sending_at`).
        Each fsync costs a few ms under the database's one write lock: at 100 steps at once that
        lock, not the CPU, set the steps' latency."""
        with self.write_lock:
            with self._write(durable) as db:
                yield db

    @contextmanager
    def _write(self, durable: bool) -> Iterator[sqlite3.Connection]:
        # The connection keeps the level its last transaction needed: a step's run of bookkeeping
        # commits switches once, not twice per commit. Every write goes through here.
        level = "FULL" if durable else "NORMAL"
        if self._synchronous != level:
            self.db.execute(f"PRAGMA synchronous = {level}")
            self._synchronous = level
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(_friendly(exc, self.path)) from None
        try:
            yield self.db
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            self.db.execute("ROLLBACK")
            raise StoreError(_friendly(exc, self.path)) from None
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # -- calls ---------------------------------------------------------------------------------
    def call(self, linkedid: str) -> Optional[Call]:
        row = self.db.execute("SELECT * FROM calls WHERE linkedid = ?", (linkedid,)).fetchone()
        return Call.from_row(row) if row else None

    @staticmethod
    def _insert_call(db: sqlite3.Connection, key: str, direction: str, phone: str, line: str, user_inner: str,
                     call_id: Optional[str] = None) -> bool:
        """A new calls row; False when the key exists (another leg or a repeated event got there first)."""
        cur = db.execute(
            "INSERT OR IGNORE INTO calls (linkedid, direction, phone, line, user_inner, shown, started_at, call_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, direction, phone, line, user_inner, json.dumps([user_inner] if user_inner else []),
             time.time(), call_id))
        return cur.rowcount == 1

    def start_call(self, linkedid: str, direction: str, phone: str, line: str, user_inner: str,
                   register: Dict[str, Any], owner: str, lease: float) -> Optional[int]:
        """Record a new call and queue its register, in one transaction.

        Returns the outbox id, or None when this linkedid was already started (another leg).
        """
        with self._tx() as db:
            if not self._insert_call(db, linkedid, direction, phone, line, user_inner):
                return None
            return self._enqueue(db, linkedid, "register", register, owner, lease)

    def adopt_call(self, key: str, call_id: str, direction: str, phone: str, line: str, user_inner: str) -> bool:
        """A call Bitrix24 registered itself (click-to-call): known CALL_ID, no register to send."""
        with self._tx() as db:
            return self._insert_call(db, key, direction, phone, line, user_inner, call_id)

    def recent_click(self, key: str, user_inner: str, phone: str, seconds: float) -> bool:
        """Another click by the same employee on the same number moments ago (a double click)."""
        row = self.db.execute(
            "SELECT 1 FROM calls WHERE linkedid LIKE 'click-%' AND linkedid != ? AND user_inner = ? AND phone = ?"
            " AND started_at > ?", (key, user_inner, phone, time.time() - seconds)).fetchone()
        return row is not None

    def stale_clicks(self, before: float) -> List[Any]:
        """Click-to-call and callback calls never answered nor finished, started before `before`."""
        return self.db.execute(
            "SELECT linkedid, user_inner FROM calls WHERE (linkedid LIKE 'click-%' OR linkedid LIKE 'callback-%')"
            " AND finish_claimed IS NULL AND answered_at IS NULL AND started_at < ?", (before,)).fetchall()

    def abandoned_calls(self, before: float) -> List[Call]:
        """Calls started before `before` whose finish was never queued (their hangup step never
        ran), except those whose register was dead-lettered (nothing to finish in Bitrix24)."""
        rows = self.db.execute(
            "SELECT * FROM calls c WHERE finish_claimed IS NULL AND started_at < ? AND NOT EXISTS"
            " (SELECT 1 FROM outbox o WHERE o.linkedid = c.linkedid AND o.kind = 'register' AND o.state = ?)"
            " ORDER BY started_at", (before, DEAD)).fetchall()
        return [Call.from_row(r) for r in rows]

    def active_key(self, linkedid: str) -> str:
        """The key of the call's part now going on: the linkedid, or its latest transfer part."""
        row = self.db.execute("SELECT active_part FROM calls WHERE linkedid = ?", (linkedid,)).fetchone()
        return row["active_part"] if row and row["active_part"] else linkedid

    def start_part(self, linkedid: str, key: str, direction: str, phone: str, line: str, user_inner: str,
                   register: Dict[str, Any], owner: str, lease: float) -> Optional[int]:
        """A transfer: the call goes on as a new part for another employee (its own CALL_ID)."""
        with self._tx() as db:
            if not self._insert_call(db, key, direction, phone, line, user_inner):
                return None
            db.execute("UPDATE calls SET active_part = ? WHERE linkedid = ?", (key, linkedid))
            return self._enqueue(db, key, "register", register, owner, lease)

    def mark_answered(self, linkedid: str, inner: Optional[str], now: Optional[float] = None) -> Optional[Call]:
        """The first answer of a call wins; returns the call as it was before this answer.

        `now`: when the answer happened (the step's own clock; default the wall clock)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM calls WHERE linkedid = ?", (linkedid,)).fetchone()
            if row is None:
                return None
            before = Call.from_row(row)
            if before.answered_at is None:
                db.execute("UPDATE calls SET answered_inner = ?, answered_at = ? WHERE linkedid = ?",
                           (inner, time.time() if now is None else now, linkedid))
            return before

    def move_card(self, linkedid: str, show: List[str], hide: List[str], shown_after: List[str],
                  owner: str, lease: float) -> int:
        """Queue one card change (show to some, hide from others) and remember who sees it."""
        with self._tx() as db:
            db.execute("UPDATE calls SET shown = ? WHERE linkedid = ?", (json.dumps(shown_after), linkedid))
            return self._enqueue(db, linkedid, "card", {"show": show, "hide": hide}, owner, lease)

    def queue_finish(self, linkedid: str, finish: Dict[str, Any], record: Optional[Dict[str, Any]],
                     owner: str, lease: float, hide: Optional[List[str]] = None) -> Optional[List[int]]:
        """Queue the call's finish (and recording) exactly once; None when another leg already did.

        `hide`: cards still up for others than the finishing employee (finish hides only his).
        """
        with self._tx() as db:
            cur = db.execute("UPDATE calls SET finish_claimed = ?, status_code = ?, duration = ?"
                             " WHERE linkedid = ? AND finish_claimed IS NULL",
                             (time.time(), finish["STATUS_CODE"], finish["DURATION"], linkedid))
            if cur.rowcount != 1:
                return None
            ids = []
            if hide:
                ids.append(self._enqueue(db, linkedid, "card", {"show": [], "hide": hide}, owner, lease))
            ids.append(self._enqueue(db, linkedid, "finish", finish, owner, lease))
            if record:
                ids.append(self._enqueue(db, linkedid, "record", record, owner, lease))
            return ids

    def queue_rest(self, linkedid: str, calls: List[Any], owner: str, lease: float) -> List[int]:
        """Queue plain method calls [(method, params), ...] after the call's other entries."""
        with self._tx() as db:
            return [self._enqueue(db, linkedid, "rest", {"method": method, "params": params}, owner, lease)
                    for method, params in calls]

    # -- outbox --------------------------------------------------------------------------------
    @staticmethod
    def _enqueue(db: sqlite3.Connection, linkedid: str, kind: str, payload: Dict[str, Any],
                 owner: str, lease: float) -> int:
        now = time.time()
        # The writer holds the lease: a concurrent flusher must not grab an entry the live
        # call step is about to deliver itself.
        cur = db.execute(
            "INSERT INTO outbox (linkedid, kind, payload, next_try, created_at, lease_owner, lease_until)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (linkedid, kind, json.dumps(payload, ensure_ascii=False), now, now, owner, now + lease))
        return int(cur.lastrowid)

    def claim(self, linkedid: str, owner: str, lease: float) -> List[Entry]:
        """Lease the pending entries of one call, in order; [] when another worker holds them."""
        now = time.time()
        sql = "SELECT * FROM outbox WHERE linkedid = ? AND state = ? ORDER BY id"
        # A step delivering what it has just journaled holds the lease already (it was written
        # with the entries, for as long): reading them is enough, nobody else may take them.
        rows = self.db.execute(sql, (linkedid, PENDING)).fetchall()
        if rows and all(r["lease_owner"] == owner and (r["lease_until"] or 0) >= now + lease - LEASE_SLACK
                        for r in rows):
            return [Entry.from_row(r) for r in rows]
        with self._tx(durable=False) as db:
            rows = db.execute(sql, (linkedid, PENDING)).fetchall()
            if any(r["lease_owner"] not in (None, owner) and (r["lease_until"] or 0) > now for r in rows):
                return []
            db.execute("UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE linkedid = ? AND state = ?",
                       (owner, now + lease, linkedid, PENDING))
        return [Entry.from_row(r) for r in rows]

    def release(self, linkedid: str, owner: str) -> None:
        with self._tx(durable=False) as db:
            db.execute("UPDATE outbox SET lease_owner = NULL, lease_until = NULL"
                       " WHERE linkedid = ? AND lease_owner = ?", (linkedid, owner))

    def due_calls(self, force: bool = False, limit: int = 1000) -> List[str]:
        """Calls with pending entries not leased by a live worker; unless `force`, only those
        whose first pending entry is due (order within a call is never skipped)."""
        now = time.time()
        rows = self.db.execute(
            "SELECT o.linkedid FROM outbox o WHERE o.state = ?"
            " AND o.id = (SELECT MIN(id) FROM outbox WHERE linkedid = o.linkedid AND state = ?)"
            " AND (? OR o.next_try <= ?)"
            " AND NOT EXISTS (SELECT 1 FROM outbox l WHERE l.linkedid = o.linkedid AND l.state = ?"
            "                 AND l.lease_until > ?)"
            " ORDER BY o.id LIMIT ?", (PENDING, PENDING, 1 if force else 0, now, PENDING, now, limit)).fetchall()
        return [r["linkedid"] for r in rows]

    def mark_sending(self, entry: Entry) -> None:
        """A request for the entry is about to go out. Durable only where a repeat would do harm:
        a finish (a lost mark would take the portal's "Call is not found" for an error) and a
        plain method call (a task comment twice). A repeated register, card move or recording
        changes nothing (see outbox.py), so their mark costs no fsync under the write lock."""
        with self._tx(durable=entry.kind in REPEAT_HARMS) as db:
            db.execute("UPDATE outbox SET sending_at = ?, attempts = attempts + 1 WHERE id = ?",
                       (time.time(), entry.id))

    def card_not_live(self, linkedid: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE calls SET card_live = 0 WHERE linkedid = ?", (linkedid,))

    def mark_done(self, entry: Entry, call_id: Optional[str] = None,
                  crm: Optional[Tuple[str, int]] = None) -> None:
        """Delivered; a register's answer (its CALL_ID and the client it was bound to) with it."""
        now = time.time()
        with self._tx(durable=False) as db:
            db.execute("UPDATE outbox SET state = ?, done_at = ?, sending_at = NULL, last_error = NULL,"
                       " lease_owner = NULL, lease_until = NULL WHERE id = ?", (DONE, now, entry.id))
            if entry.kind == "register" and call_id:
                db.execute("UPDATE calls SET call_id = ? WHERE linkedid = ?", (call_id, entry.linkedid))
            if crm is not None:
                db.execute("UPDATE calls SET crm_type = ?, crm_id = ? WHERE linkedid = ?",
                           (crm[0], crm[1], entry.linkedid))
            if entry.kind == "finish":
                db.execute("UPDATE calls SET finished_at = ? WHERE linkedid = ?", (now, entry.linkedid))
                db.execute("DELETE FROM calls WHERE started_at < ? AND finished_at IS NOT NULL",
                           (now - KEEP_SECONDS,))
                db.execute("DELETE FROM outbox WHERE state = ? AND done_at < ?", (DONE, now - KEEP_SECONDS))

    def mark_retry(self, entry_id: int, error: str, next_try: float, sent: bool,
                   before: Optional[float] = None) -> None:
        """Not delivered this time. `sent`: the request may have reached the portal; if not,
        `sending_at` goes back to `before` (an earlier attempt may have reached it)."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET next_try = ?, last_error = ?, lease_owner = NULL, lease_until = NULL,"
                       " sending_at = CASE WHEN ? THEN sending_at ELSE ? END WHERE id = ?",
                       (next_try, error[:500], 1 if sent else 0, before, entry_id))

    def note_maybe_shown(self, entry_id: int) -> None:
        """A register with SHOW=1 may have reached the portal: its card may be up for its user."""
        with self._tx() as db:
            row = db.execute("SELECT payload FROM outbox WHERE id = ?", (entry_id,)).fetchone()
            if row is not None:
                payload = dict(json.loads(row["payload"]), _maybe_shown=1)
                db.execute("UPDATE outbox SET payload = ? WHERE id = ?",
                           (json.dumps(payload, ensure_ascii=False), entry_id))

    def postpone(self, entry_id: int, note: str, next_try: float) -> None:
        """Not attempted (e.g. the recording is still being written): no attempt is counted."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET next_try = ?, last_error = ?, lease_owner = NULL, lease_until = NULL"
                       " WHERE id = ?", (next_try, note[:500], entry_id))

    def mark_dead(self, entry_id: int, reason: str, before: Optional[float] = None) -> None:
        """Dead-lettered. `sending_at` goes back to `before` (its value before this attempt): after
        `outbox retry` a finish an earlier attempt may have delivered still takes "Call is not
        found" as finished already."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET state = ?, last_error = ?, sending_at = ?, lease_owner = NULL,"
                       " lease_until = NULL WHERE id = ?", (DEAD, reason[:500], before, entry_id))

    def entry_states(self, ids: List[int]) -> Dict[int, Entry]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT * FROM outbox WHERE id IN ({marks})", ids).fetchall()
        return {r["id"]: Entry.from_row(r) for r in rows}

    def entries(self, linkedid: Optional[str] = None, state: Optional[str] = None) -> List[Entry]:
        sql, args = "SELECT * FROM outbox WHERE 1", []
        if linkedid is not None:
            sql, args = sql + " AND linkedid = ?", args + [linkedid]
        if state is not None:
            sql, args = sql + " AND state = ?", args + [state]
        return [Entry.from_row(r) for r in self.db.execute(sql + " ORDER BY id", args).fetchall()]

    def retry_dead(self) -> int:
        """Put dead letters back in line. A finish tried more than once may have reached the portal
        on an attempt older versions did not count as such (a 502): it is treated as maybe sent."""
        with self._tx() as db:
            cur = db.execute("UPDATE outbox SET state = ?, attempts = 0, next_try = ?, last_error = NULL,"
                             " sending_at = CASE WHEN kind = 'finish' AND attempts > 1"
                             " THEN COALESCE(sending_at, created_at) ELSE sending_at END"
                             " WHERE state = ?", (PENDING, time.time(), DEAD))
            return cur.rowcount

    def outbox_status(self) -> Dict[str, Any]:
        counts = {s: 0 for s in (PENDING, DONE, DEAD)}
        for row in self.db.execute("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state"):
            counts[row["state"]] = row["n"]
        oldest = self.db.execute("SELECT MIN(created_at) FROM outbox WHERE state = ?", (PENDING,)).fetchone()[0]
        last = self.db.execute("SELECT last_error FROM outbox WHERE last_error IS NOT NULL AND state != ?"
                               " ORDER BY COALESCE(next_try, 0) DESC LIMIT 1", (DONE,)).fetchone()
        return {"counts": counts, "oldest_pending": oldest, "last_error": last[0] if last else None}

    # -- bringing back what a step could not journal (spill.py) -----------------------------------
    def put_call(self, row: Dict[str, Any]) -> Optional[Call]:
        """Add a call row kept elsewhere, or fill in what this store does not know of it yet.
        Returns the call as this store had it before (None: it was new)."""
        fields = [f for f in Call.__dataclass_fields__ if f in row]
        values = [json.dumps(row[f]) if f == "shown" else row[f] for f in fields]
        with self._tx() as db:
            old = db.execute("SELECT * FROM calls WHERE linkedid = ?", (row["linkedid"],)).fetchone()
            if old is None:
                db.execute(f"INSERT INTO calls ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})", values)
                return None
            fill = [f for f in fields if f not in ("linkedid", "shown", "card_live") and old[f] is None]
            if fill:
                db.execute(f"UPDATE calls SET {', '.join(f'{f} = COALESCE({f}, ?)' for f in fill)} WHERE linkedid = ?",
                           [row[f] for f in fill] + [row["linkedid"]])
            return Call.from_row(old)

    def put_entry(self, linkedid: str, kind: str, payload: Dict[str, Any], created_at: float,
                  sending_at: Optional[float], uid: str) -> Optional[int]:
        """Journal an entry kept elsewhere, once per uid; None when it was brought back before."""
        now = time.time()
        with self._tx() as db:
            if db.execute("INSERT OR IGNORE INTO replayed (uid, at) VALUES (?, ?)", (uid, now)).rowcount != 1:
                return None
            cur = db.execute("INSERT INTO outbox (linkedid, kind, payload, next_try, created_at, sending_at)"
                             " VALUES (?, ?, ?, ?, ?, ?)",
                             (linkedid, kind, json.dumps(payload, ensure_ascii=False), now, created_at, sending_at))
            return int(cur.lastrowid)

    def replayed_all(self, uids: List[str]) -> bool:
        marks = ",".join("?" * len(uids))
        return not uids or self.db.execute(f"SELECT COUNT(*) FROM replayed WHERE uid IN ({marks})",
                                           uids).fetchone()[0] == len(set(uids))

    def settle_elsewhere(self, linkedid: str, done: List[int], sent: List[int], at: float) -> None:
        """Entries of this journal another process delivered (`done`) or may have delivered
        (`sent`) while it could not write here."""
        with self._tx() as db:
            for entry_id in done:
                db.execute("UPDATE outbox SET state = ?, done_at = ?, lease_owner = NULL, lease_until = NULL"
                           " WHERE id = ? AND linkedid = ? AND state = ?", (DONE, at, entry_id, linkedid, PENDING))
            for entry_id in sent:
                db.execute("UPDATE outbox SET sending_at = COALESCE(sending_at, ?) WHERE id = ? AND linkedid = ?",
                           (at, entry_id, linkedid))

    # -- routing cache ---------------------------------------------------------------------------
    def route(self, phone: str, max_age: float) -> Optional[str]:
        """The cached manager of `phone` ('' = known to have none), or None when not cached."""
        row = self.db.execute("SELECT inner, fetched_at FROM routes WHERE phone = ?", (phone,)).fetchone()
        if row and time.time() - row["fetched_at"] < max_age:
            return str(row["inner"])
        return None

    def remember_route(self, phone: str, inner: str) -> None:
        with self._tx(durable=False) as db:
            db.execute("INSERT OR REPLACE INTO routes (phone, inner, fetched_at) VALUES (?, ?, ?)",
                       (phone, inner, time.time()))

    # -- employees -----------------------------------------------------------------------------
    def user_id(self, inner: str, max_age: float = USER_CACHE_SECONDS) -> Optional[int]:
        row = self.db.execute("SELECT user_id, fetched_at FROM users WHERE inner = ?", (inner,)).fetchone()
        if row and time.time() - row["fetched_at"] < max_age:
            return int(row["user_id"])
        return None

    def remember_user(self, inner: str, user_id: int) -> None:
        with self._tx(durable=False) as db:
            db.execute("INSERT OR REPLACE INTO users (inner, user_id, fetched_at) VALUES (?, ?, ?)",
                       (inner, int(user_id), time.time()))
