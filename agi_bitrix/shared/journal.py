"""The local journal of a PBX on the shared store: the SQLite database under state_dir.

A call step never waits on a sick PostgreSQL: when the shared store cannot be reached (or fails
mid-step) the step runs on this journal, exactly as a PBX without PostgreSQL does, and notes the
call keys it changed. The deliverer moves them into the shared store when it is back: the call
row fills in what the shared store does not know yet, each waiting entry is added once (its uid
remembers it), and what the journal delivered meanwhile settles there. A step on the shared store
copies the calls it changed into the journal, so a call that began before an outage still ends
right during it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from agi_bitrix.store import DONE, PENDING, Call, Store

_SCHEMA = "CREATE TABLE IF NOT EXISTS shared_unsynced (linkedid TEXT PRIMARY KEY, at REAL NOT NULL)"
MARK = "journal-waiting"  # in state_dir while the journal holds anything for the shared store


def mark_path(state_dir: str) -> Path:
    """A step on the shared store looks for this file (no database opened) before it catches up."""
    return Path(state_dir) / MARK
_FIELDS = list(Call.__dataclass_fields__)


def open_local(state_dir: str, pbx: str) -> Store:
    """The journal of PBX `pbx` (what it delivers carries the PBX as the shared store's does)."""
    store = Store(state_dir)
    store.db.execute(_SCHEMA)
    store.pbx = pbx  # type: ignore[attr-defined]
    return store


def note_unsynced(local: Store, keys: Iterable[str]) -> None:
    """These calls changed in the journal while the shared store was away."""
    keys = sorted({k for k in keys if k})
    if not keys:
        return
    local.db.execute(_SCHEMA)
    with local._tx() as db:
        db.executemany("INSERT OR REPLACE INTO shared_unsynced (linkedid, at) VALUES (?, ?)",
                       [(k, time.time()) for k in keys])
    mark_path(str(local.path.parent)).touch()


def mirror(local: Store, rows: List[Dict[str, Any]]) -> None:
    """Copy call rows of the shared store into the journal (not those it changed itself since)."""
    if not rows:
        return
    import json

    local.db.execute(_SCHEMA)
    with local._tx(durable=False) as db:
        held = {r[0] for r in db.execute("SELECT linkedid FROM shared_unsynced")}
        for row in rows:
            if row["linkedid"] in held:
                continue
            values = [json.dumps(row[f]) if f == "shown" and not isinstance(row[f], str) else row[f] for f in _FIELDS]
            db.execute(f"INSERT OR REPLACE INTO calls ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})",
                       values)


def waiting(local: Store) -> List[str]:
    """Call keys the journal holds for the shared store."""
    local.db.execute(_SCHEMA)
    keys = {r[0] for r in local.db.execute("SELECT linkedid FROM shared_unsynced")}
    keys |= {r[0] for r in local.db.execute("SELECT DISTINCT linkedid FROM outbox WHERE state = ?", (PENDING,))}
    return sorted(keys)


def move(local: Store, shared: Any, pbx: str, keys: Optional[List[str]] = None) -> Tuple[int, int]:
    """Move what the journal holds (of `keys` only, if given) into the shared store: (calls,
    entries added there). Calls whose entries a live local process still leases wait for the
    next pass."""
    calls = entries = 0
    now = time.time()
    held = waiting(local)
    for key in held if keys is None else [k for k in held if k in keys]:
        rows = local.entries(key)
        if any(e.state == PENDING for e in rows) and local.db.execute(
                "SELECT 1 FROM outbox WHERE linkedid = ? AND state = ? AND lease_until > ?",
                (key, PENDING, now)).fetchone():
            continue
        call = local.call(key)
        before = None
        if call is not None:
            before = shared.put_call({f: getattr(call, f) for f in _FIELDS})
            if call.call_id:
                # Registered from the journal: a register the shared store still holds is done.
                done = [e.id for e in shared.entries(key, PENDING) if e.kind == "register"]
                shared.settle_elsewhere(key, done, [], now)
        for entry in rows:
            if entry.state != PENDING:
                continue
            if before is not None and entry.kind == "register" and shared.entries(key) and \
                    any(e.kind == "register" for e in shared.entries(key)):
                continue  # the shared store has this call's register already
            if before is not None and before.finish_claimed is not None and entry.kind in ("finish", "record"):
                continue  # another leg queued the finish there first
            uid = f"journal:{pbx}:{key}:{entry.id}:{entry.created_at!r}"
            if shared.put_entry(key, entry.kind, entry.payload, entry.created_at, entry.sending_at, uid) is not None:
                entries += 1
        with local._tx() as db:
            db.execute("DELETE FROM outbox WHERE linkedid = ? AND state IN (?, ?)", (key, PENDING, DONE))
            db.execute("DELETE FROM shared_unsynced WHERE linkedid = ?", (key,))
        calls += 1
    if not waiting(local):
        mark_path(str(local.path.parent)).unlink(missing_ok=True)
    return calls, entries


def catch_up(shared: Any, state_dir: str, linkedid: str) -> int:
    """Before a step on the shared store: what the journal kept of this call (and its transfer
    parts) while the store was away goes there first, so the step sees it. Calls moved."""
    if not mark_path(state_dir).exists():
        return 0
    local = open_local(state_dir, shared.pbx)
    try:
        keys = [k for k in waiting(local) if k == linkedid or k.startswith(f"{linkedid}-")]
        return move(local, shared, shared.pbx, keys)[0] if keys else 0
    finally:
        local.close()
