"""The PostgreSQL engine of the store: the same methods as store.Store, for several PBXs at once.

Every call key carries its PBX (`pbx`, `linkedid`): Asterisk's linkedids repeat across servers.
The outbox is one queue for all: a deliverer takes the calls of any PBX whose entries are not
leased by a live worker, so a standby carries the backlog of a PBX that died. Recordings are the
exception: the file lies on its own PBX, so only that PBX attaches it. Row locks (SELECT ... FOR
UPDATE) stand in for SQLite's one writer where a step reads before it writes.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import psycopg

from agi_bitrix.shared import schema
from agi_bitrix.shared.connect import SharedStoreError, connect, friendly
from agi_bitrix.store import (CLAIMED, DEAD, DONE, DOUBLE_CLICK, PENDING, REPEAT_HARMS, TAKEN, USER_CACHE_SECONDS,
                              Call, Entry, Mark, group_waiting, prune_in_chunks, settle_statements)

_CALL_FIELDS = [f for f in Call.__dataclass_fields__]
ADOPT_LOCK = 7_432_200  # pg_advisory_xact_lock(ADOPT_LOCK, hashtext(CALL_ID or number)): one PBX claims an event


def _call(row: Dict[str, Any]) -> Call:
    data = {k: row[k] for k in _CALL_FIELDS}
    data["shown"] = json.loads(data["shown"] or "[]")
    return Call(**data)


def _entry(row: Dict[str, Any]) -> Entry:
    return Entry(id=row["id"], linkedid=row["linkedid"], kind=row["kind"], payload=json.loads(row["payload"]),
                 state=row["state"], attempts=row["attempts"], next_try=row["next_try"],
                 created_at=row["created_at"], last_error=row["last_error"], sending_at=row["sending_at"])


class PgStore:
    """One connection (one step, or one thread of the service at a time)."""

    engine = "postgresql"

    def __init__(self, url: str, pbx: str, timeout: float = 1.0, conn: Any = None) -> None:
        self.url, self.pbx, self.timeout = url, pbx, timeout
        self.home = pbx  # the PBX this process runs on (as_pbx views another's calls)
        self.path = f"postgresql {schema.SCHEMA} ({pbx})"
        self.db = self._checked(conn if conn is not None else connect(url, pbx, timeout))
        self.touched: Set[str] = set()  # call keys this store changed (the local journal mirrors them)

    def _checked(self, conn: Any) -> Any:
        """`conn` once its schema is the one this code writes (closed and SharedStoreError if not)."""
        try:
            schema.require_current(conn)
        except psycopg.Error as exc:
            conn.close()
            raise SharedStoreError(friendly(exc, self.url)) from None
        except SharedStoreError:
            conn.close()
            raise
        return conn

    journal_dir = ""  # state_dir: the calls this store changed are copied into the local journal on close

    def close(self) -> None:
        """Copy the calls changed here into the local journal, then close."""
        self.copy_to_journal()
        self.db.close()

    def copy_to_journal(self) -> None:
        """The calls changed here, into the local journal: a call that began before an outage
        still ends right during it. The copy is a cache: its failure costs nothing."""
        try:
            if self.touched and self.journal_dir and not self.db.closed:
                from agi_bitrix.shared import journal

                rows = self.calls_rows(sorted(self.touched))
                local = journal.open_local(self.journal_dir, self.pbx)
                try:
                    journal.mirror(local, rows)
                finally:
                    local.close()
        except Exception:
            pass
        finally:
            self.touched = set()

    def alive(self) -> bool:
        """The connection is idle and the server still answers (a pooled store, before reuse)."""
        if self.db.closed or self.db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            return False
        try:
            self.db.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def revive(self) -> None:
        """A long-lived store (the dialer's) gets a new connection in place of one that broke
        (PostgreSQL restarted, the network dropped it); SharedStoreError while it is still away."""
        if self.alive():
            return
        self.db.close()
        self.db = self._checked(connect(self.url, self.pbx, self.timeout))

    # -- plumbing -------------------------------------------------------------------------------
    def _q(self, sql: str, args: Any = ()) -> Any:
        try:
            return self.db.execute(sql, args)
        except psycopg.Error as exc:
            raise SharedStoreError(friendly(exc, self.url)) from None

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[Any]:
        """One transaction; `durable=False` commits without waiting for the WAL flush (leases,
        marks of delivery, caches: a lost one only means a repeat the portal answers the same)."""
        try:
            with self.db.transaction():
                if not durable:
                    self.db.execute("SET LOCAL synchronous_commit = off")
                yield self
        except psycopg.Error as exc:
            raise SharedStoreError(friendly(exc, self.url)) from None

    def _one(self, sql: str, args: Any = ()) -> Optional[Dict[str, Any]]:
        return self._q(sql, args).fetchone()

    # -- calls ---------------------------------------------------------------------------------
    def call(self, linkedid: str) -> Optional[Call]:
        row = self._one("SELECT * FROM calls WHERE pbx = %s AND linkedid = %s", (self.pbx, linkedid))
        return _call(row) if row else None

    def _insert_call(self, key: str, direction: str, phone: str, line: str, user_inner: str,
                     call_id: Optional[str] = None) -> bool:
        cur = self._q("INSERT INTO calls (pbx, linkedid, direction, phone, line, user_inner, shown, started_at,"
                      " call_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                      (self.pbx, key, direction, phone, line, user_inner,
                       json.dumps([user_inner] if user_inner else []), time.time(), call_id))
        self.touched.add(key)
        return cur.rowcount == 1

    def start_call(self, linkedid: str, direction: str, phone: str, line: str, user_inner: str,
                   register: Dict[str, Any], owner: str, lease: float) -> Optional[int]:
        with self._tx():
            if not self._insert_call(linkedid, direction, phone, line, user_inner):
                return None
            return self._enqueue(linkedid, "register", register, owner, lease)

    def _taken(self, lock: str, where: str, args: Any) -> bool:
        """Inside a transaction: whether any PBX's calls row matches `where`, under the portal-wide
        lock on `lock` held to the commit, so of several PBXs checking at once one claims it."""
        self._q("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ADOPT_LOCK, lock))
        return self._one(f"SELECT 1 AS x FROM calls WHERE {where} LIMIT 1", args) is not None

    def adopt_call(self, key: str, call_id: str, direction: str, phone: str, line: str, user_inner: str,
                   double_click: float = 0.0) -> str:
        """A call Bitrix24 registered itself (click-to-call); TAKEN when any PBX has its CALL_ID (the
        portal posts an event to every handler bound to it, and one PBX rings); DOUBLE_CLICK when
        any PBX claimed the same employee's click on the same number within `double_click` seconds
        before, under a lock on the two, so of two clicks handled at once one is the double click."""
        with self._tx():
            if self._taken(call_id, "call_id = %s AND pbx != %s", (call_id, self.pbx)):
                return TAKEN
            double = double_click > 0 and self._taken(
                f"click:{user_inner}:{phone}",
                "linkedid LIKE 'click-%%' AND linkedid != %s AND user_inner = %s AND phone = %s AND started_at > %s",
                (key, user_inner, phone, time.time() - double_click))
            if not self._insert_call(key, direction, phone, line, user_inner, call_id):
                return TAKEN
            return DOUBLE_CLICK if double else CLAIMED

    def start_callback(self, key: str, phone: str, line: str, user_inner: str, register: Dict[str, Any],
                       owner: str, lease: float, window: float) -> Optional[int]:
        """A callback-form request, claimed for the portal: None when any PBX has this event (`key`)
        or started another callback to `phone` within `window` seconds (every bound handler gets
        the event; the visitor is called once)."""
        with self._tx():
            if self._taken(phone, "linkedid = %s OR (linkedid LIKE 'callback-%%' AND phone = %s AND started_at > %s)",
                           (key, phone, time.time() - window)):
                return None
            if not self._insert_call(key, "outgoing", phone, line, user_inner):
                return None
            return self._enqueue(key, "register", register, owner, lease)

    def stale_clicks(self, before: float) -> List[Any]:
        return self._q("SELECT linkedid, user_inner FROM calls WHERE pbx = %s AND (linkedid LIKE 'click-%%'"
                       " OR linkedid LIKE 'callback-%%') AND finish_claimed IS NULL AND answered_at IS NULL"
                       " AND started_at < %s", (self.pbx, before)).fetchall()

    def abandoned_calls(self, before: float) -> List[Call]:
        """This PBX's calls whose hangup never ran (another PBX's only once it is gone: gone_pbxs)."""
        rows = self._q("SELECT * FROM calls c WHERE pbx = %s AND finish_claimed IS NULL AND started_at < %s"
                       " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.pbx = c.pbx AND o.linkedid = c.linkedid"
                       " AND o.kind = 'register' AND o.state = %s) ORDER BY started_at",
                       (self.pbx, before, DEAD)).fetchall()
        return [_call(r) for r in rows]

    def gone_pbxs(self, silent: float, before: float) -> List[str]:
        """Other PBXs with calls open since before `before` whose deliverer has been silent for
        `silent` seconds (or never passed): nobody else closes the calls a dead PBX left open."""
        now = time.time()
        rows = self._q("SELECT DISTINCT c.pbx FROM calls c LEFT JOIN pbxs p ON p.pbx = c.pbx"
                       " WHERE c.pbx != %s AND c.finish_claimed IS NULL AND c.started_at < %s"
                       " AND (p.seen_at IS NULL OR p.seen_at < %s) ORDER BY c.pbx",
                       (self.pbx, before, now - silent)).fetchall()
        return [r["pbx"] for r in rows]

    def active_key(self, linkedid: str) -> str:
        row = self._one("SELECT active_part FROM calls WHERE pbx = %s AND linkedid = %s", (self.pbx, linkedid))
        return row["active_part"] if row and row["active_part"] else linkedid

    def start_part(self, linkedid: str, key: str, direction: str, phone: str, line: str, user_inner: str,
                   register: Dict[str, Any], owner: str, lease: float) -> Optional[int]:
        with self._tx():
            if not self._insert_call(key, direction, phone, line, user_inner):
                return None
            self._q("UPDATE calls SET active_part = %s WHERE pbx = %s AND linkedid = %s", (key, self.pbx, linkedid))
            self.touched.add(linkedid)
            return self._enqueue(key, "register", register, owner, lease)

    def mark_answered(self, linkedid: str, inner: Optional[str], now: Optional[float] = None) -> Optional[Call]:
        with self._tx():
            row = self._one("SELECT * FROM calls WHERE pbx = %s AND linkedid = %s FOR UPDATE", (self.pbx, linkedid))
            if row is None:
                return None
            before = _call(row)
            if before.answered_at is None:
                self._q("UPDATE calls SET answered_inner = %s, answered_at = %s WHERE pbx = %s AND linkedid = %s",
                        (inner, time.time() if now is None else now, self.pbx, linkedid))
                self.touched.add(linkedid)
            return before

    def move_card(self, linkedid: str, show: List[str], hide: List[str], shown_after: List[str],
                  owner: str, lease: float) -> int:
        with self._tx():
            self._q("UPDATE calls SET shown = %s WHERE pbx = %s AND linkedid = %s",
                    (json.dumps(shown_after), self.pbx, linkedid))
            self.touched.add(linkedid)
            return self._enqueue(linkedid, "card", {"show": show, "hide": hide}, owner, lease)

    def queue_finish(self, linkedid: str, finish: Dict[str, Any], record: Optional[Dict[str, Any]],
                     owner: str, lease: float, hide: Optional[List[str]] = None) -> Optional[List[int]]:
        with self._tx():
            cur = self._q("UPDATE calls SET finish_claimed = %s, status_code = %s, duration = %s"
                          " WHERE pbx = %s AND linkedid = %s AND finish_claimed IS NULL",
                          (time.time(), finish["STATUS_CODE"], finish["DURATION"], self.pbx, linkedid))
            if cur.rowcount != 1:
                return None
            self.touched.add(linkedid)
            ids = []
            if hide:
                ids.append(self._enqueue(linkedid, "card", {"show": [], "hide": hide}, owner, lease))
            ids.append(self._enqueue(linkedid, "finish", finish, owner, lease))
            if record:
                ids.append(self._enqueue(linkedid, "record", record, owner, lease))
            return ids

    def queue_rest(self, linkedid: str, calls: List[Any], owner: str, lease: float) -> List[int]:
        with self._tx():
            return [self._enqueue(linkedid, "rest", {"method": method, "params": params}, owner, lease)
                    for method, params in calls]

    # -- outbox --------------------------------------------------------------------------------
    def _enqueue(self, linkedid: str, kind: str, payload: Dict[str, Any], owner: str, lease: float,
                 pbx: Optional[str] = None) -> int:
        now = time.time()
        row = self._one("INSERT INTO outbox (pbx, linkedid, kind, payload, next_try, created_at, lease_owner,"
                        " lease_until) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                        (pbx or self.pbx, linkedid, kind, json.dumps(payload, ensure_ascii=False), now, now, owner,
                         now + lease))
        return int(row["id"])

    def lease_calls(self, owner: str, lease: float, keys: Optional[List[str]] = None, fill: bool = True,
                    due_by: Optional[float] = None, upto_id: Optional[int] = None,
                    limit: int = 50) -> List[Entry]:
        """Lease the pending entries of up to `limit` calls of this PBX no other deliverer holds,
        grouped by call, each call's in order (store.Store.lease_calls says which calls). Seen as
        another PBX (as_pbx), a call's recording and what follows it stay with that PBX (the file
        is on its disk)."""
        now = time.time()
        args = {"pbx": self.pbx, "me": owner, "now": now, "due": now if due_by is None else due_by,
                "upto": upto_id if upto_id is not None else 1 << 62, "other": self.home != self.pbx}
        with self._tx(durable=False):
            picked: List[str] = []
            if keys:
                found = {r["linkedid"] for r in self._q(
                    "SELECT DISTINCT linkedid FROM outbox WHERE pbx = %s AND state = 'pending' AND linkedid = ANY(%s)",
                    (self.pbx, list(keys)))}
                picked = [key for key in dict.fromkeys(keys) if key in found][:limit]
            first = ("f.pbx = %(pbx)s AND f.state = 'pending' AND f.next_try <= %(due)s AND f.id <= %(upto)s"
                     " AND f.id = (SELECT min(p.id) FROM outbox p WHERE p.pbx = f.pbx AND p.linkedid = f.linkedid"
                     "             AND p.state = 'pending') AND (NOT %(other)s OR f.kind != 'record')"
                     " AND NOT EXISTS (SELECT 1 FROM outbox l WHERE l.pbx = f.pbx AND l.linkedid = f.linkedid"
                     "   AND l.state = 'pending' AND l.lease_owner != %(me)s AND l.lease_until > %(now)s)")
            queries = ["SELECT f.linkedid FROM calls c JOIN outbox f ON f.pbx = c.pbx AND f.linkedid = c.linkedid"
                       f" WHERE c.pbx = %(pbx)s AND c.finish_claimed IS NULL AND {first} ORDER BY f.id LIMIT %(limit)s",
                       f"SELECT f.linkedid FROM outbox f WHERE {first} ORDER BY f.id LIMIT %(limit)s"]
            for sql in queries if fill else []:
                if len(picked) >= limit:
                    break
                args["limit"] = limit + len(picked)
                found = [r["linkedid"] for r in self._q(sql, args) if r["linkedid"] not in picked]
                picked += found[:limit - len(picked)]
            if not picked:
                return []
            rows = self._q("SELECT * FROM outbox WHERE pbx = %s AND linkedid = ANY(%s) AND state = 'pending'"
                           " ORDER BY id FOR UPDATE", (self.pbx, picked)).fetchall()
            # Under the rows' locks: a call another deliverer leased meanwhile is its.
            busy = {r["linkedid"] for r in rows
                    if r["lease_owner"] not in (None, owner) and (r["lease_until"] or 0) > now}
            kept: List[Dict[str, Any]] = []
            stop: Set[str] = set()
            for r in rows:
                if r["linkedid"] in busy or r["linkedid"] in stop:
                    continue
                if args["other"] and r["kind"] == "record":
                    stop.add(r["linkedid"])
                    continue
                kept.append(r)
            if kept:
                self._q("UPDATE outbox SET lease_owner = %s, lease_until = %s WHERE id = ANY(%s)",
                        (owner, now + lease, [r["id"] for r in kept]))
        order = {key: i for i, key in enumerate(picked)}
        return sorted((_entry(r) for r in kept), key=lambda e: (order[e.linkedid], e.id))

    def release(self, keys: List[str], owner: str) -> None:
        if not keys:
            return
        with self._tx(durable=False):
            self._q("UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE pbx = %s AND state = 'pending'"
                    " AND lease_owner = %s AND linkedid = ANY(%s)", (self.pbx, owner, list(keys)))

    def lease_owners(self) -> List[str]:
        return [r["lease_owner"] for r in self._q(
            "SELECT DISTINCT lease_owner FROM outbox WHERE state = 'pending' AND lease_owner IS NOT NULL"
            " AND lease_until > %s", (time.time(),))]

    def free_leases(self, owners: List[str]) -> int:
        if not owners:
            return 0
        with self._tx(durable=False):
            return self._q("UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE state = 'pending'"
                           " AND lease_owner = ANY(%s)", (list(owners),)).rowcount

    def make_due(self, upto_id: int) -> None:
        """A forced flush: what waits of every PBX (it carries them all) is due now."""
        now = time.time()
        with self._tx(durable=False):
            self._q("UPDATE outbox SET next_try = %s WHERE state = 'pending' AND id <= %s AND next_try > %s",
                    (now, upto_id, now))

    def last_entry_id(self) -> int:
        return int(self._one("SELECT coalesce(max(id), 0) AS m FROM outbox")["m"])

    def pbxs_due(self, upto_id: int) -> List[str]:
        """The other PBXs with due calls nobody holds (a standby carries them)."""
        now = time.time()
        return [r["pbx"] for r in self._q(
            "SELECT DISTINCT o.pbx FROM outbox o WHERE o.state = 'pending' AND o.pbx != %s AND o.id <= %s"
            " AND o.next_try <= %s AND o.kind != 'record' AND NOT EXISTS (SELECT 1 FROM outbox l WHERE"
            " l.pbx = o.pbx AND l.linkedid = o.linkedid AND l.state = 'pending' AND l.lease_until > %s)"
            " ORDER BY o.pbx", (self.pbx, upto_id, now, now))]

    def as_pbx(self, pbx: str) -> "PgStore":
        """The same connection seen as another PBX (a standby delivering its backlog)."""
        if pbx == self.pbx:
            return self
        other = PgStore.__new__(PgStore)
        other.url, other.pbx, other.path, other.db, other.touched = self.url, pbx, self.path, self.db, set()
        other.home = self.pbx
        return other

    def mark_sending(self, entries: List[Entry], not_live: Optional[List[str]] = None) -> None:
        """Durable only where a repeat would do harm (store.Store.mark_sending says why)."""
        if not entries and not not_live:
            return
        with self._tx(durable=bool(not_live) or any(e.kind in REPEAT_HARMS for e in entries)):
            if entries:
                self._q("UPDATE outbox SET sending_at = %s, attempts = attempts + 1 WHERE id = ANY(%s)",
                        (time.time(), [e.id for e in entries]))
            if not_live:
                self._q("UPDATE calls SET card_live = 0 WHERE pbx = %s AND linkedid = ANY(%s)",
                        (self.pbx, list(not_live)))
                self.touched.update(not_live)

    def settle(self, marks: List[Mark]) -> None:
        """How the attempts at these entries ended, in one transaction (store.Store.settle)."""
        if not marks:
            return
        statements = settle_statements(marks, time.time(), "pbx = ? AND linkedid = ?", lambda key: (self.pbx, key))
        with self._tx(durable=any(m.state != DONE for m in marks)):
            for sql, args in statements:
                self._q(sql.replace("?", "%s"), args)
        self.touched.update(m.entry.linkedid for m in marks
                            if m.state == DONE and m.entry.kind in ("register", "finish"))

    def mark_done(self, entry: Entry, call_id: Optional[str] = None,
                  crm: Optional[Tuple[str, int]] = None) -> None:
        self.settle([Mark(entry, DONE, call_id=call_id, crm=crm)])

    def mark_dead(self, entry: Entry, reason: str) -> None:
        self.settle([Mark(entry, DEAD, reason)])

    def prune(self, keep: float, routes_keep: float, chunk: int = 2000,
              now: Optional[float] = None) -> Dict[str, int]:
        """The history of every PBX older than `keep` seconds, as store.Store.prune (PostgreSQL's
        autovacuum reuses the space)."""
        now = time.time() if now is None else now
        steps = {
            "entries": ("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE state = 'done'"
                        " AND done_at < %s LIMIT %s)", now - keep),
            "dead": ("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE state = 'dead'"
                     " AND done_at < %s LIMIT %s)", now - keep),
            "calls": ("DELETE FROM calls WHERE (pbx, linkedid) IN (SELECT c.pbx, c.linkedid FROM calls c"
                      " WHERE c.started_at < %s AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.pbx = c.pbx"
                      " AND o.linkedid = c.linkedid AND o.state != 'done') LIMIT %s)", now - keep),
            "routes": ("DELETE FROM routes WHERE phone IN (SELECT phone FROM routes WHERE fetched_at < %s LIMIT %s)",
                       now - routes_keep),
            "replayed": ("DELETE FROM replayed WHERE uid IN (SELECT uid FROM replayed WHERE at < %s LIMIT %s)",
                         now - keep),
        }

        def delete(sql: str, args: Tuple[float, int]) -> int:
            with self._tx(durable=False):
                return self._q(sql, args).rowcount

        counts = prune_in_chunks(steps, chunk, delete)
        counts["entries"] += counts.pop("dead")
        counts["freed_kib"] = 0
        return counts

    def note_maybe_shown(self, entry_id: int) -> None:
        with self._tx():
            row = self._one("SELECT payload FROM outbox WHERE id = %s FOR UPDATE", (entry_id,))
            if row is not None:
                payload = dict(json.loads(row["payload"]), _maybe_shown=1)
                self._q("UPDATE outbox SET payload = %s WHERE id = %s",
                        (json.dumps(payload, ensure_ascii=False), entry_id))

    def entry_states(self, ids: List[int]) -> Dict[int, Entry]:
        if not ids:
            return {}
        rows = self._q("SELECT * FROM outbox WHERE id = ANY(%s)", (list(ids),)).fetchall()
        return {r["id"]: _entry(r) for r in rows}

    def entries(self, linkedid: Optional[str] = None, state: Optional[str] = None) -> List[Entry]:
        sql, args = "SELECT * FROM outbox WHERE pbx = %s", [self.pbx]
        if linkedid is not None:
            sql, args = sql + " AND linkedid = %s", args + [linkedid]
        if state is not None:
            sql, args = sql + " AND state = %s", args + [state]
        return [_entry(r) for r in self._q(sql + " ORDER BY id", args).fetchall()]

    def retry_dead(self) -> int:
        with self._tx():
            cur = self._q("UPDATE outbox SET state = %s, attempts = 0, next_try = %s, last_error = NULL,"
                          " sending_at = CASE WHEN kind = 'finish' AND attempts > 1"
                          " THEN COALESCE(sending_at, created_at) ELSE sending_at END"
                          " WHERE pbx = %s AND state = %s", (PENDING, time.time(), self.pbx, DEAD))
            return cur.rowcount

    def outbox_status(self) -> Dict[str, Any]:
        counts = {s: 0 for s in (PENDING, DONE, DEAD)}
        for row in self._q("SELECT state, count(*) AS n FROM outbox WHERE pbx = %s GROUP BY state", (self.pbx,)):
            counts[row["state"]] = row["n"]
        oldest = self._one("SELECT min(created_at) AS m FROM outbox WHERE pbx = %s AND state = %s",
                           (self.pbx, PENDING))["m"]
        last = self._one("SELECT last_error FROM outbox WHERE pbx = %s AND last_error IS NOT NULL AND state != %s"
                         " ORDER BY COALESCE(next_try, 0) DESC LIMIT 1", (self.pbx, DONE))
        kinds = {r["kind"]: r["n"] for r in self._q(
            "SELECT kind, count(*) AS n FROM outbox WHERE pbx = %s AND state = 'pending' GROUP BY kind", (self.pbx,))}
        return {"counts": counts, "oldest_pending": oldest, "last_error": last["last_error"] if last else None,
                "pending_kinds": kinds}

    def waiting(self, upto_id: Optional[int] = None) -> List[Dict[str, Any]]:
        """What of this PBX waits, grouped by why (store.group_waiting)."""
        rows = self._q(
            "SELECT o.kind, o.last_error, o.lease_owner, o.lease_until, o.next_try, o.created_at,"
            " o.id = (SELECT min(p.id) FROM outbox p WHERE p.pbx = o.pbx AND p.linkedid = o.linkedid"
            "         AND p.state = 'pending') AS first"
            " FROM outbox o WHERE o.pbx = %s AND o.state = 'pending' AND o.id <= %s",
            (self.pbx, upto_id if upto_id is not None else 1 << 62)).fetchall()
        return group_waiting(rows, time.time())

    private = False  # every process sees it

    # -- bringing back what was journaled elsewhere (the local journal, spill files) -----------
    def put_call(self, row: Dict[str, Any]) -> Optional[Call]:
        """Add a call kept elsewhere, or fill in what this store does not know of it yet; the call
        as it was here before (None: it was new)."""
        fields = [f for f in _CALL_FIELDS if f in row]
        values = [json.dumps(row[f]) if f == "shown" and not isinstance(row[f], str) else row[f] for f in fields]
        with self._tx():
            old = self._one("SELECT * FROM calls WHERE pbx = %s AND linkedid = %s FOR UPDATE",
                            (self.pbx, row["linkedid"]))
            self.touched.add(row["linkedid"])
            if old is None:
                self._q(f"INSERT INTO calls (pbx, {', '.join(fields)}) VALUES (%s, {', '.join(['%s'] * len(fields))})"
                        " ON CONFLICT DO NOTHING", [self.pbx] + values)
                return None
            fill = [f for f in fields if f not in ("linkedid", "shown", "card_live") and old[f] is None
                    and row[f] is not None]
            if fill:
                self._q(f"UPDATE calls SET {', '.join(f'{f} = %s' for f in fill)} WHERE pbx = %s AND linkedid = %s",
                        [row[f] for f in fill] + [self.pbx, row["linkedid"]])
            return _call(old)

    def put_entry(self, linkedid: str, kind: str, payload: Dict[str, Any], created_at: float,
                  sending_at: Optional[float], uid: str) -> Optional[int]:
        now = time.time()
        with self._tx():
            if self._q("INSERT INTO replayed (uid, at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                       (uid, now)).rowcount != 1:
                return None
            row = self._one("INSERT INTO outbox (pbx, linkedid, kind, payload, next_try, created_at, sending_at)"
                            " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                            (self.pbx, linkedid, kind, json.dumps(payload, ensure_ascii=False), now, created_at,
                             sending_at))
            return int(row["id"])

    def replayed_all(self, uids: List[str]) -> bool:
        if not uids:
            return True
        row = self._one("SELECT count(*) AS n FROM replayed WHERE uid = ANY(%s)", (list(uids),))
        return row["n"] == len(set(uids))

    def settle_elsewhere(self, linkedid: str, done: List[int], sent: List[int], at: float) -> None:
        with self._tx():
            if done:
                self._q("UPDATE outbox SET state = %s, done_at = %s, lease_owner = NULL, lease_until = NULL"
                        " WHERE id = ANY(%s) AND pbx = %s AND linkedid = %s AND state = %s",
                        (DONE, at, list(done), self.pbx, linkedid, PENDING))
            if sent:
                self._q("UPDATE outbox SET sending_at = COALESCE(sending_at, %s) WHERE id = ANY(%s) AND pbx = %s"
                        " AND linkedid = %s", (at, list(sent), self.pbx, linkedid))

    def calls_rows(self, keys: List[str]) -> List[Dict[str, Any]]:
        """The rows of these calls of this PBX, as plain dicts (for the local journal's copy)."""
        if not keys:
            return []
        rows = self._q("SELECT * FROM calls WHERE pbx = %s AND linkedid = ANY(%s)", (self.pbx, list(keys))).fetchall()
        return [{k: r[k] for k in _CALL_FIELDS} for r in rows]

    # -- caches (portal facts: one for all PBXs) ------------------------------------------------
    def _cached(self, table: str, key: str, value: str, wanted: str, max_age: float) -> Any:
        row = self._one(f"SELECT {value} AS v, fetched_at FROM {table} WHERE {key} = %s", (wanted,))
        return row["v"] if row and time.time() - row["fetched_at"] < max_age else None

    def _remember(self, table: str, key: str, value: str, wanted: str, found: Any) -> None:
        with self._tx(durable=False):
            self._q(f"INSERT INTO {table} ({key}, {value}, fetched_at) VALUES (%s, %s, %s) ON CONFLICT ({key})"
                    f" DO UPDATE SET {value} = EXCLUDED.{value}, fetched_at = EXCLUDED.fetched_at",
                    (wanted, found, time.time()))

    def route(self, phone: str, max_age: float) -> Optional[str]:
        """The cached manager of `phone` ('' = known to have none), or None when not cached."""
        found = self._cached("routes", "phone", "inner_number", phone, max_age)
        return None if found is None else str(found)

    def remember_route(self, phone: str, inner: str) -> None:
        self._remember("routes", "phone", "inner_number", phone, inner)

    def user_id(self, inner: str, max_age: float = USER_CACHE_SECONDS) -> Optional[int]:
        found = self._cached("users", "inner_number", "user_id", inner, max_age)
        return None if found is None else int(found)

    def remember_user(self, inner: str, user_id: int) -> None:
        self._remember("users", "inner_number", "user_id", inner, int(user_id))
