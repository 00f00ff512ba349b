"""The shared store's schema, versioned: each migration runs once, in order, in one transaction.

`agi-bitrix migrate` (and `install`) apply what is missing; nothing else writes the schema, so a
call step never waits on DDL. A schema newer than this code is refused: an older agi-bitrix must
not write rows whose meaning changed.
"""
from __future__ import annotations

import time
from typing import Any, List, Optional, Tuple

import psycopg

from agi_bitrix import __version__
from agi_bitrix.shared.connect import SCHEMA, SharedStoreError, friendly

MIGRATIONS: List[Tuple[int, str, str]] = [
    (1, "call state, outbox, caches, tokens, request budget, dialer, PBX registry", """
CREATE TABLE pbxs (
    pbx          TEXT PRIMARY KEY,
    identity     TEXT NOT NULL,             -- host and state folder: two PBXs with one pbx_id differ here
    seen_at      DOUBLE PRECISION NOT NULL, -- its deliverer's last pass
    version      TEXT NOT NULL DEFAULT ''
);
CREATE TABLE calls (
    pbx             TEXT NOT NULL,
    linkedid        TEXT NOT NULL,
    direction       TEXT NOT NULL,
    phone           TEXT NOT NULL,
    line            TEXT NOT NULL DEFAULT '',
    user_inner      TEXT NOT NULL,
    call_id         TEXT,
    shown           TEXT NOT NULL DEFAULT '[]',
    answered_inner  TEXT,
    answered_at     DOUBLE PRECISION,
    started_at      DOUBLE PRECISION NOT NULL,
    finish_claimed  DOUBLE PRECISION,
    finished_at     DOUBLE PRECISION,
    status_code     TEXT,
    duration        INTEGER,
    card_live       INTEGER NOT NULL DEFAULT 1,
    crm_type        TEXT,
    crm_id          BIGINT,
    active_part     TEXT,
    PRIMARY KEY (pbx, linkedid)
);
CREATE INDEX calls_open ON calls (pbx, started_at) WHERE finish_claimed IS NULL;
CREATE INDEX calls_call_id ON calls (call_id);
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    pbx          TEXT NOT NULL,
    linkedid     TEXT NOT NULL,
    kind         TEXT NOT NULL,
    payload      TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_try     DOUBLE PRECISION NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    done_at      DOUBLE PRECISION,
    last_error   TEXT,
    sending_at   DOUBLE PRECISION,
    lease_owner  TEXT,
    lease_until  DOUBLE PRECISION
);
CREATE INDEX outbox_pending ON outbox (next_try) WHERE state = 'pending';
CREATE INDEX outbox_call ON outbox (pbx, linkedid, id);
CREATE INDEX outbox_done ON outbox (done_at) WHERE state = 'done';
CREATE TABLE replayed (
    uid   TEXT PRIMARY KEY,
    at    DOUBLE PRECISION NOT NULL
);
CREATE TABLE users (
    inner_number TEXT PRIMARY KEY,
    user_id      BIGINT NOT NULL,
    fetched_at   DOUBLE PRECISION NOT NULL
);
CREATE TABLE routes (
    phone        TEXT PRIMARY KEY,
    inner_number TEXT NOT NULL,
    fetched_at   DOUBLE PRECISION NOT NULL
);
CREATE TABLE tokens (
    portal           TEXT PRIMARY KEY,
    pair             TEXT NOT NULL,            -- JSON, as oauth-tokens.json holds it
    refreshing_until DOUBLE PRECISION,         -- a refresh is in flight until then (its process may have left)
    updated_at       DOUBLE PRECISION NOT NULL
);
CREATE TABLE budgets (
    portal  TEXT PRIMARY KEY,
    state   TEXT NOT NULL DEFAULT '{}'         -- the leaky bucket and method blocks, as ratelimit.py keeps them
);
CREATE TABLE dialer_tasks (
    task_id        BIGINT PRIMARY KEY,
    title          TEXT NOT NULL DEFAULT '',
    client         TEXT NOT NULL DEFAULT '',
    operator       TEXT NOT NULL DEFAULT '',
    attempts       INTEGER NOT NULL DEFAULT 0,
    next_try       DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_outcome   TEXT,
    last_attempt   DOUBLE PRECISION,
    final          DOUBLE PRECISION,
    away_since     DOUBLE PRECISION,
    notes          TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE dialer_attempts (
    attempt_id   TEXT PRIMARY KEY,
    pbx          TEXT NOT NULL,
    task_id      BIGINT NOT NULL,
    phone        TEXT NOT NULL,
    operator     TEXT NOT NULL,
    mode         TEXT NOT NULL,
    info         TEXT NOT NULL DEFAULT '{}',
    started_at   DOUBLE PRECISION NOT NULL,
    state        TEXT NOT NULL DEFAULT 'dialing',
    outcome      TEXT,
    finished_at  DOUBLE PRECISION
);
CREATE INDEX dialer_attempts_live ON dialer_attempts (task_id) WHERE state != 'done';
"""),
]
LATEST = MIGRATIONS[-1][0]
MIGRATE_LOCK = 7_432_001  # pg_advisory_xact_lock key: two PBXs migrating at once take turns


def version(conn: Any) -> Optional[int]:
    """The schema version in the database; None when agi-bitrix never migrated it."""
    row = conn.execute("SELECT to_regclass(%s) AS t", (f"{SCHEMA}.schema_version",)).fetchone()
    if row["t"] is None:
        return None
    row = conn.execute("SELECT max(version) AS v FROM schema_version").fetchone()
    return int(row["v"] or 0)


def require_current(conn: Any) -> int:
    """The schema this code can use, or SharedStoreError saying what to run."""
    found = version(conn)
    if found is None:
        raise SharedStoreError("the shared store has no agi-bitrix tables yet: run agi-bitrix migrate")
    if found > LATEST:
        raise SharedStoreError(f"the shared store's schema is version {found}, newer than this agi-bitrix "
                               f"({__version__}, schema {LATEST}): upgrade agi-bitrix on this PBX")
    if found < LATEST:
        raise SharedStoreError(f"the shared store's schema is version {found}, this agi-bitrix needs {LATEST}: "
                               "run agi-bitrix migrate")
    return found


def migrate(conn: Any, url: str) -> Tuple[Optional[int], int]:
    """Apply the missing migrations; (version before, version after)."""
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                         " applied_at DOUBLE PRECISION NOT NULL, by_version TEXT NOT NULL)")
            before = version(conn) or 0
            if before > LATEST:
                raise SharedStoreError(f"the shared store's schema is version {before}, newer than this "
                                       f"agi-bitrix ({__version__}, schema {LATEST}): upgrade agi-bitrix on this PBX")
            for number, _, ddl in MIGRATIONS:
                if number > before:
                    conn.execute(ddl)
                    conn.execute("INSERT INTO schema_version (version, applied_at, by_version) VALUES (%s, %s, %s)",
                                 (number, time.time(), __version__))
    except psycopg.Error as exc:
        raise SharedStoreError(friendly(exc, url)) from None
    return (before or None), LATEST
