"""A call step whose state_dir cannot be written (read-only, disk full) still reaches Bitrix24.

The step runs against a copy of its call's state in memory: read from the database while it
can be read, and from what earlier steps of the call spilled. It delivers directly within its
budget. What it could not deliver, and what the journal must learn (a CALL_ID, entries it
delivered for the journal), is written whole into the step's log line (`undelivered`) and
appended to a spill file next to the log. `agi-bitrix outbox replay FILE...` brings both back
into the journal once the disk is fixed; replaying a record twice changes nothing.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from agi_bitrix.ownership import match_owner
from agi_bitrix.store import DB_NAME, DONE, PENDING, Store

SPILL_NAME = "agi-bitrix.undelivered.jsonl"
MARK = "agi-bitrix-spill/1"  # the record format


def spill_path(log_file: str) -> Path:
    return Path(log_file).with_name(SPILL_NAME)


def _records(path: Path) -> Iterable[Dict[str, Any]]:
    """Spill records in a spill file or a log (inside its lines' `undelivered`), in order."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            found = data.get("undelivered") if data.get("format") != MARK else [data]
            for rec in found if isinstance(found, list) else []:
                if isinstance(rec, dict) and rec.get("format") == MARK and isinstance(rec.get("key"), str):
                    yield rec


class MemoryState:
    """One step's state in memory, and what it must hand back to the journal."""

    def __init__(self, state_dir: str, log_file: str, linkedid: str) -> None:
        self.store = Store.in_memory()
        self.spill_file = spill_path(log_file)
        self.disk_ids: List[int] = []
        self.uids: Dict[int, str] = {}                 # memory entry id -> uid of a spilled entry
        self.done_before: Dict[str, List[int]] = {}    # carried from earlier spills, by key
        self.sent_before: Dict[str, List[int]] = {}
        self.notes: List[str] = []
        self.blind = False  # a database is there but cannot be read: what it knows is unknown here
        try:
            self.disk_ids = self.store.copy_call(Path(state_dir) / DB_NAME, linkedid)
        except sqlite3.Error as exc:
            self.blind = True
            self.notes.append(f"state database not readable either: {exc}")
        self._from_spill(linkedid)
        self.seen = {c["linkedid"]: dict(c) for c in self.store.db.execute("SELECT * FROM calls")}

    def _from_spill(self, linkedid: str) -> None:
        """The latest spilled record of this call (and of its part now going on)."""
        if not self.spill_file.exists():
            return
        latest: Dict[str, Dict[str, Any]] = {}
        try:
            for rec in _records(self.spill_file):
                latest[rec["key"]] = rec
        except OSError as exc:
            self.notes.append(f"spill file not readable: {exc.strerror}")
            return
        keys = [linkedid]
        call = latest.get(linkedid, {}).get("call") or {}
        if call.get("active_part"):
            keys.append(call["active_part"])
        for key in keys:
            if key in latest:
                self._adopt(latest[key])

    def _adopt(self, rec: Dict[str, Any]) -> None:
        key = rec["key"]
        if isinstance(rec.get("call"), dict):
            self.store.put_call(rec["call"])
        done, sent = list(rec.get("done_in_journal") or []), list(rec.get("sent_in_journal") or [])
        self.done_before[key], self.sent_before[key] = done, sent
        self.store.settle_elsewhere(key, done, sent, float(rec.get("at") or time.time()))
        for entry in rec.get("entries") or []:
            new_id = self.store.put_entry(key, entry["kind"], entry["payload"], entry["created_at"],
                                          entry.get("sending_at"), entry["uid"])
            if new_id is not None:
                self.uids[new_id] = entry["uid"]

    def leftovers(self) -> List[Dict[str, Any]]:
        """A record per call key whose state the journal must learn; [] when there is none."""
        out = []
        now = time.time()
        for row in self.store.db.execute("SELECT * FROM calls").fetchall():
            key = row["linkedid"]
            entries = self.store.entries(key)
            waiting = [e for e in entries if e.state == PENDING and e.id not in self.disk_ids]
            in_journal = [e for e in entries if e.id in self.disk_ids]
            done = sorted(set(self.done_before.get(key, [])) | {e.id for e in in_journal if e.state == DONE})
            sent = sorted(set(self.sent_before.get(key, [])) |
                          {e.id for e in in_journal if e.state == PENDING and e.sending_at is not None})
            dead = [f"{e.kind}: {e.last_error}" for e in entries if e.state == "dead" and e.id not in self.disk_ids]
            if not waiting and not done and not sent and self.seen.get(key) == dict(row):
                continue
            call = dict(row)
            call["shown"] = json.loads(call["shown"] or "[]")
            out.append({"format": MARK, "key": key, "at": now, "call": call,
                        "entries": [{"uid": self.uids.get(e.id) or uuid.uuid4().hex, "kind": e.kind,
                                     "payload": e.payload, "created_at": e.created_at,
                                     "sending_at": e.sending_at} for e in waiting],
                        "done_in_journal": done, "sent_in_journal": sent,
                        **({"dead": dead} if dead else {})})
        return out

    def spill(self, records: List[Dict[str, Any]]) -> Optional[str]:
        """Append the records to the spill file; the problem when it cannot take them."""
        data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records).encode("utf-8")
        try:
            fd = os.open(self.spill_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            return f"spill file {self.spill_file}: {exc.strerror}"
        try:
            match_owner(fd, self.spill_file.parent)
            if os.write(fd, data) != len(data):  # one write: O_APPEND lines of concurrent steps never mix
                return f"spill file {self.spill_file}: short write"
            os.fsync(fd)
        except OSError as exc:
            return f"spill file {self.spill_file}: {exc.strerror}"
        finally:
            os.close(fd)
        return None

    def close(self) -> None:
        self.store.close()


def _latest(paths: Iterable[Path]) -> List[Dict[str, Any]]:
    """The latest record of each call key, oldest first."""
    latest: Dict[str, Dict[str, Any]] = {}
    for path in paths:
        for rec in _records(path):
            if rec["key"] not in latest or float(rec.get("at") or 0) >= float(latest[rec["key"]].get("at") or 0):
                latest[rec["key"]] = rec
    return sorted(latest.values(), key=lambda r: float(r.get("at") or 0))


def not_replayed(store: Optional[Store], path: Path) -> int:
    """How many calls of the spill file at `path` the journal (None: unusable) has not taken back yet."""
    try:
        latest = _latest([path]) if path.exists() else []
    except OSError:
        return 0  # unreadable: the file check names it
    return sum(1 for rec in latest if store is None or store.call(rec["key"]) is None
               or not store.replayed_all([e["uid"] for e in rec.get("entries") or []]))


def replay(store: Store, paths: List[str]) -> Tuple[int, int]:
    """Bring spilled records back into the journal: the latest record of each call key wins.
    Returns (calls, entries journaled); entries replayed before are skipped."""
    calls = entries = 0
    for rec in _latest(Path(p) for p in paths):
        key = rec["key"]
        claimed_before = None
        if isinstance(rec.get("call"), dict):
            before = store.put_call(rec["call"])
            claimed_before = before.finish_claimed if before is not None else None
        store.settle_elsewhere(key, list(rec.get("done_in_journal") or []), list(rec.get("sent_in_journal") or []),
                               float(rec.get("at") or time.time()))
        calls += 1
        for entry in rec.get("entries") or []:
            if claimed_before is not None and entry["kind"] in ("finish", "record"):
                continue  # the journal had this call's finish from another leg already
            if store.put_entry(key, entry["kind"], entry["payload"], entry["created_at"], entry.get("sending_at"),
                               entry["uid"]) is not None:
                entries += 1
    return calls, entries
