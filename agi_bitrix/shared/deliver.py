"""The deliverer of a PBX on the shared store (worker, `agi-bitrix service`, `outbox flush`).

Each pass: this PBX says it is alive (and that its pbx_id is its own), notes how many PBXs share
the request budget, hands the store a token pair it renewed while the store failed, moves what its
local journal kept while PostgreSQL was away, closes its calls whose hangup never ran (and those of
a PBX that is gone: its deliverer silent for ALIVE seconds), then delivers the calls of every PBX
that no live worker holds, oldest first. A PBX killed in the middle of a call leaves its entries
leased for the lease's length; after that any PBX's deliverer carries them, once. While the shared
store is away the pass delivers from the local journal instead.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List

from agi_bitrix import __version__
from agi_bitrix.outbox import FlushStats, Outbox
from agi_bitrix.shared import journal
from agi_bitrix.shared.connect import SharedStoreError, identity
from agi_bitrix.store import StoreError

ALIVE = 300.0  # a PBX whose deliverer passed this recently is alive: another may not take its pbx_id


def register(store: Any, state_dir: str, now: float = 0.0) -> None:
    """Note this PBX as alive; SharedStoreError when another live PBX has its pbx_id."""
    now = now or time.time()
    me = identity(state_dir)
    with store._tx(durable=False):
        row = store._one("SELECT identity, seen_at FROM pbxs WHERE pbx = %s FOR UPDATE", (store.pbx,))
        if row is not None and row["identity"] != me and now - row["seen_at"] < ALIVE:
            raise SharedStoreError(duplicate(store.pbx, row["identity"]))
        store._q("INSERT INTO pbxs (pbx, identity, seen_at, version) VALUES (%s, %s, %s, %s) ON CONFLICT (pbx)"
                 " DO UPDATE SET identity = EXCLUDED.identity, seen_at = EXCLUDED.seen_at,"
                 " version = EXCLUDED.version", (store.pbx, me, now, __version__))


def duplicate(pbx: str, other: str) -> str:
    return (f"another PBX ({other}) uses pbx_id {pbx} in the shared store: give each PBX its own [storage] "
            "pbx_id (a PBX that replaced it may take it over once it has been silent 5 minutes)")


def others(store: Any) -> List[Dict[str, Any]]:
    return store._q("SELECT pbx, identity, seen_at, version FROM pbxs WHERE pbx != %s ORDER BY pbx",
                    (store.pbx,)).fetchall()


def note_share(store: Any, client: Any) -> None:
    """How many PBXs share the portal's budget now: this PBX's share of it while the store is away."""
    if hasattr(client.limiter, "note_pbxs"):
        row = store._one("SELECT count(*) AS n FROM pbxs WHERE seen_at > %s", (time.time() - ALIVE,))
        client.limiter.note_pbxs(row["n"])


def share_renewed_pair(settings: Any, logger: Any) -> None:
    """A pair this PBX renewed while the shared store failed (it is only in oauth-tokens.json)
    reaches the store now, not at this PBX's next request: the other PBXs wait for it (the
    refresh mark), and their copy's refresh token is spent."""
    if settings.bitrix24.mode != "oauth":
        return
    from agi_bitrix.bitrix.oauth import TokenStoreError, token_store

    tokens = token_store(settings)
    if not tokens.unshared.exists():  # type: ignore[attr-defined]
        return
    try:
        tokens.load()  # brings the copy along (shared/tokens.py)
    except TokenStoreError as exc:
        logger.error("tokens_shared", reason=str(exc))
        return
    if not tokens.unshared.exists():  # type: ignore[attr-defined]
        logger.info("tokens_shared", note="the pair renewed while the shared store failed is in it now")


def close_for_the_gone(store: Any, settings: Any, owner: str, logger: Any, now: float = 0.0) -> int:
    """The calls a PBX left open when it died (silent ALIVE seconds): closed after [calls]
    max_call_length as its own deliverer would have, each once (its finish is claimed in the
    same row a hangup or another PBX would claim it); the pass that follows delivers them."""
    from agi_bitrix.abandoned import close_abandoned

    now = now or time.time()
    closed = 0
    for pbx in store.gone_pbxs(ALIVE, now - settings.calls.max_call_length):
        for record in close_abandoned(store.as_pbx(pbx), settings, owner, now):
            logger.warning("call_closed_unfinished", pbx=pbx, **record)
            closed += 1
    return closed


def shared_pass(settings: Any, client: Any, logger: Any, force: bool = False, owner: str = "",
                prune: bool = True) -> FlushStats:
    """One pass: this PBX's calls in batches, then those of any other PBX nobody holds (a standby
    carries the backlog of a PBX that died); then, when `prune`, every PBX's history past its
    retention (a long-running deliverer asks for that once per PRUNE_EVERY, as on SQLite)."""
    from agi_bitrix.commands.outbox import close_abandoned, prune_history
    from agi_bitrix.stores import open_store

    storage = settings.storage
    try:
        store = open_store(settings, timeout=max(storage.db_timeout, 5.0))
    except StoreError as exc:
        logger.warning("shared_store_away", reason=str(exc))
        stats = _journal_pass(settings, client, force, owner)
        stats.errors = [f"{exc}; delivered from the local journal, which moves to the shared store when it is back"]
        return stats
    try:
        register(store, storage.state_dir)
        note_share(store, client)
        share_renewed_pair(settings, logger)
        local = journal.open_local(storage.state_dir, storage.pbx_id)
        try:
            calls, entries = journal.move(local, store, storage.pbx_id)
        finally:
            local.close()
        if calls:
            logger.info("journal_moved", calls=calls, entries=entries)
        outbox = Outbox(store, client, settings.calls.recording_url, owner=owner or None)
        close_abandoned(settings, outbox, logger)
        close_for_the_gone(store, settings, outbox.owner, logger)
        total = outbox.flush(force=force)
        for pbx in store.pbxs_due(store.last_entry_id()):
            carried = Outbox(store.as_pbx(pbx), client, settings.calls.recording_url, outbox.owner,
                             outbox.log).flush(force=force)
            total.add(carried)
            total.groups += carried.groups
            if carried.delivered:
                logger.info("carried", pbx=pbx, calls=carried.calls, delivered=carried.delivered)
        if prune:
            prune_history(settings, store, logger)  # every PBX's history, off the call path
    finally:
        store.close()
    return total


def _journal_pass(settings: Any, client: Any, force: bool, owner: str) -> FlushStats:
    """The shared store is away: deliver what the journal holds, and remember the calls it changed."""
    local = journal.open_local(settings.storage.state_dir, settings.storage.pbx_id)
    try:
        stats = Outbox(local, client, settings.calls.recording_url, owner=owner or None).flush(force=force)
        journal.note_unsynced(local, stats.keys)
        return stats
    finally:
        local.close()
