"""The dialer's memory, in the same SQLite database as the calls and the outbox.

`dialer_tasks`: per Bitrix24 task, the attempts made, when to try next, the last outcome, and
whether dialing it is over. `dialer_attempts`: one row per dial attempt; its id is the
originated channel's ChannelId, hence the call's linkedid and its unique EXTERNAL_CALL_ID.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from agi_bitrix.store import Store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dialer_tasks (
    task_id        INTEGER PRIMARY KEY,
    title          TEXT NOT NULL DEFAULT '',
    client         TEXT NOT NULL DEFAULT '',
    operator       TEXT NOT NULL DEFAULT '',
    attempts       INTEGER NOT NULL DEFAULT 0,
    next_try       REAL NOT NULL DEFAULT 0,
    last_outcome   TEXT,
    last_attempt   REAL,
    final          REAL,                      -- dialing over (when); a later deadline re-opens it
    away_since     REAL,                      -- responsible unavailable since
    notes          TEXT NOT NULL DEFAULT '[]' -- comments already written (not repeated)
);
CREATE TABLE IF NOT EXISTS dialer_attempts (
    attempt_id   TEXT PRIMARY KEY,
    task_id      INTEGER NOT NULL,
    phone        TEXT NOT NULL,
    operator     TEXT NOT NULL,
    mode         TEXT NOT NULL,
    info         TEXT NOT NULL DEFAULT '{}',  -- title, client name, CRM binding
    started_at   REAL NOT NULL,
    state        TEXT NOT NULL DEFAULT 'dialing',  -- dialing | answered | connected | done
    outcome      TEXT,
    finished_at  REAL
);
CREATE INDEX IF NOT EXISTS dialer_attempts_live ON dialer_attempts (state);
"""
STALE_ATTEMPT = 4 * 3600.0  # an attempt never closed (crash) stops blocking its operator after this


@dataclass
class TaskState:
    task_id: int
    title: str
    client: str
    operator: str
    attempts: int
    next_try: float
    last_outcome: Optional[str]
    last_attempt: Optional[float]
    final: Optional[float]
    away_since: Optional[float]
    notes: List[str]


@dataclass
class Attempt:
    attempt_id: str
    task_id: int
    phone: str
    operator: str
    mode: str
    info: Dict[str, Any]
    started_at: float
    state: str
    outcome: Optional[str]


def task_state(task_id: int, row: Any) -> TaskState:
    """A task's record as stored (either engine), or a fresh one for a task never seen."""
    if row is None:
        return TaskState(task_id, "", "", "", 0, 0.0, None, None, None, None, [])
    data = dict(row)
    data["notes"] = json.loads(data["notes"])
    return TaskState(**data)


def dialer_state(store: Any) -> Any:
    """The dialer's memory in the store's engine: SQLite here, or the store several PBXs share."""
    if getattr(store, "engine", "sqlite") == "postgresql":
        from agi_bitrix.shared.dialer import SharedDialerState

        return SharedDialerState(store)
    return DialerState(store)


class DialerState:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db
        self.db.executescript(_SCHEMA)

    def task(self, task_id: int) -> TaskState:
        return task_state(task_id, self.db.execute("SELECT * FROM dialer_tasks WHERE task_id = ?",
                                                   (task_id,)).fetchone())

    def save_task(self, state: TaskState) -> None:
        with self.store._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO dialer_tasks (task_id, title, client, operator, attempts, next_try,"
                " last_outcome, last_attempt, final, away_since, notes) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (state.task_id, state.title, state.client, state.operator, state.attempts, state.next_try,
                 state.last_outcome, state.last_attempt, state.final, state.away_since, json.dumps(state.notes)))

    def tasks(self) -> List[TaskState]:
        ids = [r[0] for r in self.db.execute("SELECT task_id FROM dialer_tasks ORDER BY next_try, task_id")]
        return [self.task(i) for i in ids]

    # -- attempts -------------------------------------------------------------------------------
    def start_attempt(self, attempt: Attempt, known: Optional[float] = None) -> bool:
        """Record an attempt unless the task already has a live one (two dialers, one task).
        `known` (the latest attempt the dialer knew of) matters where dialers share a store
        (shared/dialer.py); here one dialer per PBX runs at a time."""
        with self.store._tx() as db:
            live = db.execute("SELECT 1 FROM dialer_attempts WHERE task_id = ? AND state != 'done'"
                              " AND started_at > ?", (attempt.task_id, time.time() - STALE_ATTEMPT)).fetchone()
            if live:
                return False
            db.execute("INSERT INTO dialer_attempts (attempt_id, task_id, phone, operator, mode, info, started_at,"
                       " state) VALUES (?,?,?,?,?,?,?,?)",
                       (attempt.attempt_id, attempt.task_id, attempt.phone, attempt.operator, attempt.mode,
                        json.dumps(attempt.info, ensure_ascii=False), attempt.started_at, "dialing"))
            return True

    def attempt(self, attempt_id: str) -> Optional[Attempt]:
        row = self.db.execute("SELECT * FROM dialer_attempts WHERE attempt_id = ?", (attempt_id,)).fetchone()
        if row is None:
            return None
        data = dict(row)
        data["info"] = json.loads(data["info"])
        data.pop("finished_at", None)
        return Attempt(**data)

    def set_attempt_state(self, attempt_id: str, state: str) -> None:
        with self.store._tx() as db:
            db.execute("UPDATE dialer_attempts SET state = ? WHERE attempt_id = ? AND state != 'done'",
                       (state, attempt_id))

    def close_attempt(self, attempt_id: str, outcome: str) -> bool:
        """Exactly one writer records an attempt's outcome (engine, `failed` or `hangup` step)."""
        with self.store._tx() as db:
            cur = db.execute("UPDATE dialer_attempts SET state = 'done', outcome = ?, finished_at = ?"
                             " WHERE attempt_id = ? AND state != 'done'", (outcome, time.time(), attempt_id))
            return cur.rowcount == 1

    def live_attempts(self) -> List[Attempt]:
        rows = self.db.execute("SELECT attempt_id FROM dialer_attempts WHERE state != 'done' AND started_at > ?",
                               (time.time() - STALE_ATTEMPT,)).fetchall()
        return [a for a in (self.attempt(r[0]) for r in rows) if a is not None]
