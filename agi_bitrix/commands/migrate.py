"""`agi-bitrix migrate`: apply the schema migrations this version brings (`install` runs it too).

SQLite under state_dir (one PBX), or the PostgreSQL store of `[storage] url`, where this PBX is
also entered under its pbx_id (refused while another live PBX has that id).
"""
from __future__ import annotations

from typing import Any, List

from agi_bitrix import settings as settings_mod
from agi_bitrix.commands.admin import CommandFailed
from agi_bitrix.store import StoreError

MIGRATE_TIMEOUT = 30.0  # DDL may wait for the locks of steps running meanwhile


def migrate(settings: Any, quiet: bool = False) -> List[str]:
    """What was done, one line each; StoreError (one line with the fix) when it cannot be.
    `quiet`: only what changed (install stays silent on a second run)."""
    from agi_bitrix.store import SQLITE_SCHEMA, Store

    storage = settings.storage
    store = Store(storage.state_dir)  # the journal: the whole state on SQLite, the fallback otherwise
    store.close()
    lines = [] if quiet and store.schema_before == SQLITE_SCHEMA else [
        f"state database {store.path}: schema version {SQLITE_SCHEMA}"]
    if not storage.url:
        return lines
    from agi_bitrix.shared import schema
    from agi_bitrix.shared.connect import connect, where
    from agi_bitrix.shared.deliver import register
    from agi_bitrix.shared.store import PgStore

    conn = connect(storage.url, storage.pbx_id, MIGRATE_TIMEOUT)
    try:
        before, after = schema.migrate(conn, storage.url)
        shared = PgStore(storage.url, storage.pbx_id, conn=conn)
        register(shared, storage.state_dir)
    finally:
        conn.close()
    was = "new" if before is None else f"was {before}"
    if not (quiet and before == after):
            lines.append(f"shared store at {where(storage.url)}: schema version {after} ({was}); this PBX is "
                     f"{storage.pbx_id}")
    return lines


def run(args: Any) -> int:
    try:
        settings = settings_mod.load(getattr(args, "settings", None))
        lines = migrate(settings)
    except (settings_mod.SettingsError, StoreError) as exc:
        raise CommandFailed(str(exc)) from None
    for line in lines:
        print(line)
    return 0
