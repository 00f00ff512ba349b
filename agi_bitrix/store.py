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
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from agi_bitrix.ownership import match_owner_quietly

DB_NAME = "agi-bitrix.sqlite3"
USER_CACHE_SECONDS = 3600
LEASE_SLACK = 1.0  # a lease held for at most this much less than asked is not renewed
VACUUM_MIN_PAGES = 256          # free pages worth giving back to the file system (1 MB of 4 KB pages)
VACUUM_CHUNK = 2048             # pages given back per write lock (8 MB)
WAL_KEEP = 4 << 20              # bytes of write-ahead log kept on disk once it was copied into the database
CONVERT_MAX_BYTES = 8 << 20     # an old database is switched to incremental vacuum only up to this size

PENDING, DONE, DEAD = "pending", "done", "dead"
# What adopt_call made of a click-to-call: the employee's call to ring, another PBX's (or an event
# already handled), or a double click on the same number moments after his previous one.
CLAIMED, TAKEN, DOUBLE_CLICK = "claimed", "taken", "double click"
REPEAT_HARMS = ("finish", "rest")  # entry kinds whose second delivery is not the same as one
# Entry kinds (outbox_batch.py has a _plan_<kind> for each): register, card, finish, record, and
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
CREATE INDEX IF NOT EXISTS outbox_call ON outbox (linkedid, id);
-- Partial indexes: what waits is found by reading the waiting entries only, what is settled by
-- its age, however long the history (SQLite docs: partial indexes).
DROP INDEX IF EXISTS outbox_due;
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (linkedid, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_queue ON outbox (id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_settled ON outbox (done_at) WHERE state != 'pending';
CREATE INDEX IF NOT EXISTS routes_fetched ON routes (fetched_at);
CREATE INDEX IF NOT EXISTS replayed_at ON replayed (at);
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


def prune_in_chunks(steps: Dict[str, Tuple[str, float]], chunk: int,
                    delete: Callable[[str, Tuple[float, int]], int]) -> Dict[str, int]:
    """Run each step's DELETE (its cutoff and `chunk` as arguments) until it takes less than a
    chunk; `delete` runs one in a short transaction of its own and says how many rows went."""
    counts = {}
    for name, (sql, before) in steps.items():
        counts[name] = 0
        while True:
            gone = delete(sql, (before, chunk))
            counts[name] += gone
            if gone < chunk:
                break
    return counts


def group_waiting(rows: Any, now: float) -> List[Dict[str, Any]]:
    """Waiting entries (kind, last_error, lease_owner, lease_until, next_try, created_at, first)
    grouped by why they wait, largest groups first (both engines)."""
    groups: Dict[Any, Dict[str, Any]] = {}
    for r in rows:
        held = r["lease_owner"] if r["lease_owner"] and (r["lease_until"] or 0) > now else None
        if held:
            key = ("lease", held)
        elif r["last_error"]:
            key = ("error", r["last_error"])
        elif not r["first"]:
            key = ("behind", "")
        else:
            key = ("new", "")
        group = groups.setdefault(key, {"why": key[0], "text": key[1], "count": 0, "kinds": {},
                                        "until": 0.0, "next_try": None, "oldest": r["created_at"]})
        group["count"] += 1
        group["kinds"][r["kind"]] = group["kinds"].get(r["kind"], 0) + 1
        group["until"] = max(group["until"], r["lease_until"] or 0.0)
        group["next_try"] = r["next_try"] if group["next_try"] is None else min(group["next_try"], r["next_try"])
        group["oldest"] = min(group["oldest"], r["created_at"])
    return sorted(groups.values(), key=lambda g: -g["count"])


Statement = Tuple[str, Tuple[Any, ...]]


def settle_statements(marks: List["Mark"], now: float, call: str = "linkedid = ?",
                      call_args: Callable[[str], Tuple[Any, ...]] = lambda key: (key,)) -> List[Statement]:
    """What settling these marks writes, as (SQL with ? placeholders, arguments), for both engines
    (`call`: how a call's row is found)."""
    out: List[Statement] = []
    for m in marks:
        entry = m.entry
        if m.state == DONE:
            out.append(("UPDATE outbox SET state = 'done', done_at = ?, sending_at = NULL, last_error = NULL,"
                        " lease_owner = NULL, lease_until = NULL WHERE id = ?", (now, entry.id)))
            if entry.kind == "register" and m.call_id:
                out.append((f"UPDATE calls SET call_id = ? WHERE {call}", (m.call_id, *call_args(entry.linkedid))))
            if m.crm is not None:
                out.append((f"UPDATE calls SET crm_type = ?, crm_id = ? WHERE {call}",
                            (m.crm[0], m.crm[1], *call_args(entry.linkedid))))
            if entry.kind == "finish":
                out.append((f"UPDATE calls SET finished_at = ? WHERE {call}", (now, *call_args(entry.linkedid))))
        elif m.state == DEAD:
            # sending_at goes back to its value before this attempt: after `outbox retry` a finish an
            # earlier attempt may have delivered still takes "Call is not found" as finished already.
            out.append(("UPDATE outbox SET state = 'dead', last_error = ?, sending_at = ?, done_at = ?,"
                        " lease_owner = NULL, lease_until = NULL WHERE id = ?",
                        (m.note[:500], entry.sending_at, now, entry.id)))
        elif m.attempted:
            # `sent`: the request may have reached the portal; if not, sending_at goes back to its
            # value before (an earlier attempt may have reached it).
            out.append(("UPDATE outbox SET next_try = ?, last_error = ?, lease_owner = NULL, lease_until = NULL,"
                        " sending_at = CASE WHEN ? THEN sending_at ELSE ? END WHERE id = ?",
                        (m.next_try, m.note[:500], bool(m.sent), entry.sending_at, entry.id)))
        else:  # not attempted (a recording still being written): no attempt counted
            out.append(("UPDATE outbox SET next_try = ?, last_error = ?, lease_owner = NULL, lease_until = NULL"
                        " WHERE id = ?", (m.next_try, m.note[:500], entry.id)))
    return out


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


@dataclass
class Mark:
    """How one attempt at an entry ended (Store.settle writes a batch's marks in one transaction)."""
    entry: Entry
    state: str                    # DONE, DEAD, or PENDING: again later
    note: str = ""                # why: the dead letter's reason, the error to retry after
    next_try: float = 0.0         # PENDING: when to try again
    sent: bool = False            # PENDING: the request may have reached the portal
    attempted: bool = True        # PENDING: False when it was not tried at all (no attempt counted)
    call_id: Optional[str] = None  # DONE register: the call's CALL_ID
    crm: Optional[Tuple[str, int]] = None  # DONE register: the client the portal bound the call to


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
            # Pages freed by pruning go back to the file system (Store.prune). It takes effect
            # only for a new database, so it comes before WAL mode writes the file's header (and
            # only then: on a database that has it, setting it again costs a write).
            if self.db.execute("PRAGMA page_count").fetchone()[0] == 0:
                self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.db.execute("PRAGMA journal_mode = WAL")
            # FULL: a call record acknowledged to Asterisk survives a power cut, not only a crash.
            self.db.execute("PRAGMA synchronous = FULL")
            self._synchronous = "FULL"
            # A big pruning grows the log; once copied into the database it shrinks back to this.
            self.db.execute(f"PRAGMA journal_size_limit = {WAL_KEEP}")
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

    @property
    def private(self) -> bool:
        """A copy in memory (Store.in_memory): no other process or thread sees it."""
        return str(self.path) == ":memory:"

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

    def adopt_call(self, key: str, call_id: str, direction: str, phone: str, line: str, user_inner: str,
                   double_click: float = 0.0) -> str:
        """A call Bitrix24 registered itself (click-to-call): known CALL_ID, no register to send.
        TAKEN when the key exists; DOUBLE_CLICK when the same employee's click on the same number
        was claimed within `double_click` seconds before, judged in the same write transaction: of
        two clicks handled at once, the second is the double click, never both."""
        with self._tx() as db:
            double = double_click > 0 and db.execute(
                "SELECT 1 FROM calls WHERE linkedid LIKE 'click-%' AND linkedid != ? AND user_inner = ? AND phone = ?"
                " AND started_at > ? LIMIT 1", (key, user_inner, phone, time.time() - double_click)).fetchone()
            if not self._insert_call(db, key, direction, phone, line, user_inner, call_id):
                return TAKEN
            return DOUBLE_CLICK if double else CLAIMED

    def start_callback(self, key: str, phone: str, line: str, user_inner: str, register: Dict[str, Any],
                       owner: str, lease: float, window: float) -> Optional[int]:
        """Claim a callback-form request and queue its register, in one write transaction (its lock
        makes the check and the claim one step for every process of this PBX). None when this event
        (`key`) was taken, or another callback to `phone` started within `window` seconds."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM calls WHERE linkedid = ? OR (linkedid LIKE 'callback-%' AND phone = ?"
                          " AND started_at > ?) LIMIT 1", (key, phone, time.time() - window)).fetchone():
                return None
            if not self._insert_call(db, key, "outgoing", phone, line, user_inner):
                return None
            return self._enqueue(db, key, "register", register, owner, lease)

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

    def lease_calls(self, owner: str, lease: float, keys: Optional[List[str]] = None, fill: bool = True,
                    due_by: Optional[float] = None, upto_id: Optional[int] = None,
                    limit: int = 50) -> List[Entry]:
        """Lease the pending entries of up to `limit` calls no other deliverer holds, and return
        them grouped by call, each call's in order (the order of delivery within a call).

        `keys` come first, whatever their backoff (a call step delivering its own calls). With
        `fill`, other calls follow whose first pending entry is due by `due_by` and not newer than
        `upto_id`: calls still going on (no finish queued yet: registers and card moves) first, then
        the rest oldest first, so a backlog never holds up the card of a live call.
        """
        now = time.time()
        if keys and not fill:
            # A step delivering what it has just journaled holds the lease already (it was written
            # with the entries, for as long): reading them is enough, nobody else may take them;
            # and with nothing left of its calls there is nothing to lease.
            marks = ", ".join("?" * len(keys))
            rows = self.db.execute(f"SELECT * FROM outbox WHERE state = 'pending' AND linkedid IN ({marks})"
                                   f" ORDER BY id", list(keys)).fetchall()
            if not rows:
                return []
            if all(r["lease_owner"] == owner and (r["lease_until"] or 0) >= now + lease - LEASE_SLACK for r in rows):
                order = {key: i for i, key in enumerate(dict.fromkeys(keys))}
                return sorted((Entry.from_row(r) for r in rows), key=lambda e: (order[e.linkedid], e.id))
        free = "(l.lease_owner IS NULL OR l.lease_owner = :me OR l.lease_until <= :now)"
        args: Dict[str, Any] = {"me": owner, "now": now, "due": now if due_by is None else due_by,
                                "upto": upto_id if upto_id is not None else 1 << 62}
        picked: List[str] = []
        with self._tx(durable=False) as db:
            if keys:
                args.update({f"k{i}": key for i, key in enumerate(keys)})
                marks = ", ".join(f":k{i}" for i in range(len(keys)))
                found = {r[0] for r in db.execute(
                    f"SELECT DISTINCT o.linkedid FROM outbox o WHERE o.state = 'pending'"
                    f" AND o.linkedid IN ({marks}) AND NOT EXISTS (SELECT 1 FROM outbox l"
                    f" WHERE l.linkedid = o.linkedid AND l.state = 'pending' AND NOT {free})", args)}
                picked = [key for key in dict.fromkeys(keys) if key in found][:limit]
            # A call qualifies by its first waiting entry: due, not newer than `upto`, and no
            # entry of it leased by someone else. Live calls are found through the partial index
            # of calls not finished, the others by walking the waiting entries oldest first until
            # enough are found: each costs what waits, never the history.
            first = ("f.id = (SELECT MIN(p.id) FROM outbox p WHERE p.linkedid = f.linkedid AND p.state = 'pending')"
                     " AND f.state = 'pending' AND f.next_try <= :due AND f.id <= :upto"
                     " AND NOT EXISTS (SELECT 1 FROM outbox l WHERE l.linkedid = f.linkedid"
                     f" AND l.state = 'pending' AND NOT {free})")
            queries = ["SELECT c.linkedid FROM calls c CROSS JOIN outbox f ON f.linkedid = c.linkedid"
                       f" WHERE c.finish_claimed IS NULL AND {first} ORDER BY f.id LIMIT :limit",
                       f"SELECT f.linkedid FROM outbox f WHERE f.state = 'pending' AND {first}"
                       " ORDER BY f.id LIMIT :limit"]
            for sql in queries if fill else []:
                if len(picked) >= limit:
                    break
                # Enough rows to fill the request even when some are calls picked already.
                args["limit"] = limit + len(picked)
                picked += [r[0] for r in db.execute(sql, args) if r[0] not in picked][:limit - len(picked)]
            if not picked:
                return []
            order = {key: i for i, key in enumerate(picked)}
            marks = ", ".join("?" * len(picked))
            db.execute(f"UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE state = 'pending'"
                       f" AND linkedid IN ({marks})", [owner, now + lease] + picked)
            rows = db.execute(f"SELECT * FROM outbox WHERE state = 'pending' AND linkedid IN ({marks})"
                              f" ORDER BY id", picked).fetchall()
        entries = [Entry.from_row(r) for r in rows]
        entries.sort(key=lambda e: (order[e.linkedid], e.id))
        return entries

    def release(self, keys: List[str], owner: str) -> None:
        """Give up this owner's leases on these calls (what it did not deliver waits for the next)."""
        if not keys:
            return
        marks = ", ".join("?" * len(keys))
        with self._tx(durable=False) as db:
            db.execute(f"UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE state = 'pending'"
                       f" AND lease_owner = ? AND linkedid IN ({marks})", [owner] + list(keys))

    def lease_owners(self) -> List[str]:
        """Who holds leases on waiting entries now."""
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT lease_owner FROM outbox WHERE state = 'pending' AND lease_owner IS NOT NULL"
            " AND lease_until > ?", (time.time(),))]

    def free_leases(self, owners: List[str]) -> int:
        """Leases of deliverers known to be gone (killed mid-batch): free now, not at expiry."""
        if not owners:
            return 0
        marks = ", ".join("?" * len(owners))
        with self._tx(durable=False) as db:
            return db.execute(f"UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE state = 'pending'"
                              f" AND lease_owner IN ({marks})", owners).rowcount

    def make_due(self, upto_id: int) -> None:
        """`outbox flush`: everything waiting now is tried now, whatever its backoff said."""
        with self._tx(durable=False) as db:
            db.execute("UPDATE outbox SET next_try = ? WHERE state = 'pending' AND id <= ? AND next_try > ?",
                       (time.time(), upto_id, time.time()))

    def last_entry_id(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()[0])

    def mark_sending(self, entries: List[Entry], not_live: Optional[List[str]] = None) -> None:
        """Requests about to go out: from now on their outcome is unknown until the portal answers.
        Durable only where a repeat would do harm: a finish (a lost mark would take the portal's
        "Call is not found" for an error) and a plain method call (a task comment twice); a
        repeated register, card move or recording changes nothing (see outbox.py), so their mark
        costs no fsync under the write lock. `not_live`: calls registered after they ended, without
        a card (nobody has one to move)."""
        if not entries and not not_live:
            return
        durable = bool(not_live) or any(e.kind in REPEAT_HARMS for e in entries)
        with self._tx(durable=durable) as db:
            if entries:
                db.execute(f"UPDATE outbox SET sending_at = ?, attempts = attempts + 1 WHERE id IN"
                           f" ({', '.join('?' * len(entries))})", [time.time()] + [e.id for e in entries])
            if not_live:
                db.execute(f"UPDATE calls SET card_live = 0 WHERE linkedid IN ({', '.join('?' * len(not_live))})",
                           list(not_live))

    def settle(self, marks: List["Mark"]) -> None:
        """How the attempts at these entries ended, in one transaction.

        Marks of delivery alone skip the fsync (see _tx): a lost one only means a repeat, which
        the portal answers the same way. A retry or a dead letter is kept durably.
        """
        if not marks:
            return
        with self._tx(durable=any(m.state != DONE for m in marks)) as db:
            for sql, args in settle_statements(marks, time.time()):
                db.execute(sql, args)

    def mark_done(self, entry: Entry, call_id: Optional[str] = None,
                  crm: Optional[Tuple[str, int]] = None) -> None:
        """Delivered; a register's answer (its CALL_ID and the client it was bound to) with it."""
        self.settle([Mark(entry, DONE, call_id=call_id, crm=crm)])

    def mark_dead(self, entry: Entry, reason: str) -> None:
        self.settle([Mark(entry, DEAD, reason)])

    def note_maybe_shown(self, entry_id: int) -> None:
        """A register with SHOW=1 may have reached the portal: its card may be up for its user."""
        with self._tx() as db:
            row = db.execute("SELECT payload FROM outbox WHERE id = ?", (entry_id,)).fetchone()
            if row is not None:
                payload = dict(json.loads(row["payload"]), _maybe_shown=1)
                db.execute("UPDATE outbox SET payload = ? WHERE id = ?",
                           (json.dumps(payload, ensure_ascii=False), entry_id))

    def entry_states(self, ids: List[int]) -> Dict[int, Entry]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT * FROM outbox WHERE id IN ({marks})", ids).fetchall()
        return {r["id"]: Entry.from_row(r) for r in rows}

    def pending_kinds(self, linkedids: List[str]) -> Dict[str, Set[str]]:
        """The kinds of entry still waiting, by call, for these calls (those with none left out).
        One query and no payload decoded: the service asks it for every step it hands over."""
        if not linkedids:
            return {}
        marks = ",".join("?" * len(linkedids))
        found: Dict[str, Set[str]] = {}
        for linkedid, kind in self.db.execute(f"SELECT DISTINCT linkedid, kind FROM outbox WHERE state = 'pending'"
                                               f" AND linkedid IN ({marks})", list(linkedids)):
            found.setdefault(linkedid, set()).add(kind)
        return found

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
        """Counts by state, the oldest waiting entry, the latest error, and what waits by kind."""
        counts = {PENDING: 0, DONE: 0, DEAD: 0}
        # Each count reads a partial index with its own condition written out (SQLite uses a
        # partial index only for a query that repeats its WHERE term).
        counts[PENDING] = self.db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
        for row in self.db.execute("SELECT state, COUNT(*) AS n FROM outbox WHERE state != 'pending' GROUP BY state"):
            counts[row["state"]] = row["n"]
        oldest = self.db.execute("SELECT MIN(created_at) FROM outbox WHERE state = 'pending'").fetchone()[0]
        last = self.db.execute("SELECT last_error FROM outbox WHERE state = 'pending' AND last_error IS NOT NULL"
                               " ORDER BY next_try DESC LIMIT 1").fetchone()
        if last is None:
            last = self.db.execute("SELECT last_error FROM outbox WHERE state != 'pending' AND state = 'dead'"
                                   " ORDER BY done_at DESC LIMIT 1").fetchone()
        kinds = {r["kind"]: r["n"] for r in self.db.execute(
            "SELECT kind, COUNT(*) AS n FROM outbox WHERE state = 'pending' GROUP BY kind")}
        return {"counts": counts, "oldest_pending": oldest, "last_error": last[0] if last else None,
                "pending_kinds": kinds}

    def waiting(self, upto_id: Optional[int] = None) -> List[Dict[str, Any]]:
        """What waits, grouped by why: the reason of its last attempt, a lease another deliverer
        holds, or an earlier entry of its call it waits behind. Largest groups first."""
        now = time.time()
        rows = self.db.execute(
            "SELECT o.kind, o.last_error, o.lease_owner, o.lease_until, o.next_try, o.created_at,"
            " o.id = (SELECT MIN(p.id) FROM outbox p WHERE p.linkedid = o.linkedid AND p.state = 'pending') AS first"
            " FROM outbox o WHERE o.state = 'pending' AND o.id <= ?", (upto_id if upto_id is not None else 1 << 62,))
        return group_waiting(rows, now)

    # -- keeping the database small (the deliverer prunes it, never a call step) -----------------------
    def prune(self, keep: float, routes_keep: float, chunk: int = 2000,
              now: Optional[float] = None) -> Dict[str, int]:
        """Delete what is older than `keep` seconds: delivered entries and dead letters, calls with
        nothing left waiting (finished or not), replay marks; cached routes older than
        `routes_keep`. Each chunk is a short transaction of its own, by indexed ranges, so the
        call steps' writes get the lock between them; freed pages then go back to the file system.
        """
        now = time.time() if now is None else now
        cutoff = now - keep
        steps = {
            "entries": ("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE state != 'pending'"
                        " AND done_at < ? LIMIT ?)", cutoff),
            # A call goes once nothing of it waits or is dead-lettered (kept for `outbox retry`).
            "calls": ("DELETE FROM calls WHERE linkedid IN (SELECT c.linkedid FROM calls c WHERE c.started_at < ?"
                      " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.linkedid = c.linkedid AND o.state != 'done')"
                      " LIMIT ?)", cutoff),
            "routes": ("DELETE FROM routes WHERE phone IN (SELECT phone FROM routes WHERE fetched_at < ? LIMIT ?)",
                       now - routes_keep),
            "replayed": ("DELETE FROM replayed WHERE uid IN (SELECT uid FROM replayed WHERE at < ? LIMIT ?)",
                         cutoff),
        }

        def delete(sql: str, args: Tuple[float, int]) -> int:
            with self._tx(durable=False) as db:
                return db.execute(sql, args).rowcount

        counts = prune_in_chunks(steps, chunk, delete)
        counts["freed_kib"] = self._give_back_pages()
        return counts

    def _give_back_pages(self) -> int:
        """Return free pages to the file system, a few MB per write lock (the call steps' writes
        go in between); KiB given back (SQLite docs: auto_vacuum, incremental_vacuum)."""
        db = self.db
        page = db.execute("PRAGMA page_size").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        if free < VACUUM_MIN_PAGES:
            return 0
        before = db.execute("PRAGMA page_count").fetchone()[0]
        if db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            while free > 0:
                with self.write_lock:
                    # It frees one page per step of the statement: executescript steps it to the end.
                    db.executescript(f"PRAGMA incremental_vacuum({VACUUM_CHUNK});")
                left = db.execute("PRAGMA freelist_count").fetchone()[0]
                if left >= free:
                    break
                free = left
        elif (before - free) * page <= CONVERT_MAX_BYTES:
            # A database made before pages were given back: VACUUM switches it over once. It
            # holds the write lock while it copies the live data, so only while that is small.
            with self.write_lock:
                db.execute("PRAGMA auto_vacuum = INCREMENTAL")
                db.execute("VACUUM")
        else:
            return 0
        # In WAL mode the file shrinks when the log is copied into it; a passive checkpoint never
        # waits for (nor blocks) the steps' readers and writers.
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        after = db.execute("PRAGMA page_count").fetchone()[0]
        return max(0, before - after) * page // 1024

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
