"""The dialer's memory in the shared store: one record per Bitrix24 task for every PBX's dialer.

Two dialers over the same tasks: the first to start an attempt holds the task (a transaction-scoped
advisory lock on the task id serialises them, PostgreSQL docs: advisory locks); a dialer whose view
of the task is older than an attempt another one started works other tasks instead. A stale view
never rolls a task's attempts back.
"""
from __future__ import annotations

import json
import time
from typing import List, Optional

from agi_bitrix.dialer.state import STALE_ATTEMPT, Attempt, TaskState, task_state

TASK_LOCK = 7_432_100  # pg_advisory_xact_lock(TASK_LOCK, task_id)


class SharedDialerState:
    def __init__(self, store: object) -> None:
        self.store = store

    def task(self, task_id: int) -> TaskState:
        return task_state(task_id, self.store._one("SELECT * FROM dialer_tasks WHERE task_id = %s", (task_id,)))

    def save_task(self, state: TaskState) -> None:
        with self.store._tx():
            self.store._q(
                "INSERT INTO dialer_tasks (task_id, title, client, operator, attempts, next_try, last_outcome,"
                " last_attempt, final, away_since, notes) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT (task_id) DO UPDATE SET title = EXCLUDED.title, client = EXCLUDED.client,"
                " operator = EXCLUDED.operator, attempts = EXCLUDED.attempts, next_try = EXCLUDED.next_try,"
                " last_outcome = EXCLUDED.last_outcome, last_attempt = EXCLUDED.last_attempt,"
                " final = EXCLUDED.final, away_since = EXCLUDED.away_since, notes = EXCLUDED.notes"
                # another dialer counted an attempt since this one read the task: keep that count
                " WHERE EXCLUDED.attempts >= dialer_tasks.attempts"
                " OR (dialer_tasks.final IS NOT NULL AND EXCLUDED.final IS NULL)",
                (state.task_id, state.title, state.client, state.operator, state.attempts, state.next_try,
                 state.last_outcome, state.last_attempt, state.final, state.away_since, json.dumps(state.notes)))

    def tasks(self) -> List[TaskState]:
        rows = self.store._q("SELECT task_id FROM dialer_tasks ORDER BY next_try, task_id").fetchall()
        return [self.task(r["task_id"]) for r in rows]

    def start_attempt(self, attempt: Attempt, known: Optional[float] = None) -> bool:
        """Record an attempt unless the task has a live one, or one newer than `known` (the latest
        attempt this dialer knew of when it read the task; None: only live ones block): a task
        is dialed by one dialer, once per turn. Attempt times are compared with each other only,
        so the PBXs' clocks need not agree; an attempt older than STALE_ATTEMPT (a dialer that
        died) blocks nothing."""
        with self.store._tx():
            self.store._q("SELECT pg_advisory_xact_lock(%s, %s)", (TASK_LOCK, attempt.task_id % 2**31))
            live = self.store._one(
                "SELECT 1 AS x FROM dialer_attempts WHERE task_id = %s AND started_at > %s"
                " AND (state != 'done' OR started_at > %s)",
                (attempt.task_id, time.time() - STALE_ATTEMPT, known if known is not None else float("inf")))
            if live:
                return False
            self.store._q("INSERT INTO dialer_attempts (attempt_id, pbx, task_id, phone, operator, mode, info,"
                          " started_at, state) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                          (attempt.attempt_id, self.store.pbx, attempt.task_id, attempt.phone, attempt.operator,
                           attempt.mode, json.dumps(attempt.info, ensure_ascii=False), attempt.started_at,
                           "dialing"))
            return True

    def attempt(self, attempt_id: str) -> Optional[Attempt]:
        row = self.store._one("SELECT * FROM dialer_attempts WHERE attempt_id = %s", (attempt_id,))
        if row is None:
            return None
        data = {k: row[k] for k in Attempt.__dataclass_fields__}
        data["info"] = json.loads(data["info"])
        return Attempt(**data)

    def set_attempt_state(self, attempt_id: str, state: str) -> None:
        with self.store._tx():
            self.store._q("UPDATE dialer_attempts SET state = %s WHERE attempt_id = %s AND state != 'done'",
                          (state, attempt_id))

    def close_attempt(self, attempt_id: str, outcome: str) -> bool:
        with self.store._tx():
            cur = self.store._q("UPDATE dialer_attempts SET state = 'done', outcome = %s, finished_at = %s"
                                " WHERE attempt_id = %s AND state != 'done'", (outcome, time.time(), attempt_id))
            return cur.rowcount == 1

    def live_attempts(self) -> List[Attempt]:
        """Every PBX's live attempts: an operator busy on one PBX's call is busy for all."""
        rows = self.store._q("SELECT attempt_id FROM dialer_attempts WHERE state != 'done' AND started_at > %s",
                             (time.time() - STALE_ATTEMPT,)).fetchall()
        return [a for a in (self.attempt(r["attempt_id"]) for r in rows) if a is not None]
