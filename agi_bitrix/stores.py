"""Which engine holds the state: SQLite under state_dir (one PBX, the default) or the PostgreSQL
store several PBXs share (`[storage] url`). Both give the same methods (store.Store,
shared.store.PgStore); psycopg is imported only for the second."""
from __future__ import annotations

from typing import Any, Optional

from agi_bitrix.store import Store


def open_store(settings: Any, timeout: Optional[float] = None, **sqlite: Any) -> Any:
    """The store the settings name; StoreError (one line, with the fix) when it cannot be used."""
    storage = settings.storage
    if not storage.url:
        return Store(storage.state_dir, **sqlite)
    from agi_bitrix.shared.store import PgStore

    store = PgStore(storage.url, storage.pbx_id, timeout if timeout is not None else storage.db_timeout)
    store.journal_dir = storage.state_dir
    return store


def is_shared(store: Any) -> bool:
    return getattr(store, "engine", "sqlite") == "postgresql"
