"""A small, fast state database: the history is pruned by the deliverer, never by a call step,
by indexed ranges; freed pages go back to the file system; a step costs the same at 100k past
calls as on an empty database."""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import ServicePBX

from agi_bitrix.bitrix.auth import WebhookAuth
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.deadline import Deadline
from agi_bitrix.outbox import Outbox
from agi_bitrix.store import Store
from agi_bitrix.testing.traffic import DAY, FINISH, REGISTER_PARAMS as REGISTER, past_calls


@pytest.fixture
def state_dir(fast_dir) -> str:
    return fast_dir


def test_the_history_past_its_retention_goes_and_the_file_shrinks(state_dir):
    now = time.time()
    store = Store(state_dir)
    past_calls(store.path, 20000, 30, now)
    # What must stay whatever its age: a call still waiting for delivery, a fresh dead letter.
    store.start_call("old-waiting", "incoming", "+79161234567", "", "101", REGISTER, "x", 0)
    store.start_call("old-dead", "incoming", "+79161234567", "", "101", REGISTER, "x", 0)
    (entry,) = store.entries("old-dead")
    store.mark_dead(entry, "User is not found")
    # Calls that never finished (their hangup never ran, nothing waits), routes long stale.
    store.start_call("never-finished", "incoming", "+79161234567", "", "101", REGISTER, "x", 0)
    store.mark_done(store.entries("never-finished")[0], "externalCall.x")
    store.db.execute("UPDATE calls SET started_at = ? WHERE linkedid IN ('old-waiting', 'old-dead', 'never-finished')",
                     (now - 20 * DAY,))
    store.remember_route("+79160000001", "102")
    store.remember_route("+79160000002", "103")
    store.db.execute("UPDATE routes SET fetched_at = ? WHERE phone = '+79160000001'", (now - 3600,))
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = os.path.getsize(store.path)

    counts = store.prune(7 * DAY, 300, now=now)
    kept = 20000 * 7 // 30  # the calls of the last 7 of 30 days
    assert abs(counts["calls"] - (20000 - kept + 1)) <= 2 and abs(counts["entries"] - 3 * (20000 - kept)) <= 6
    assert counts["routes"] == 1 and counts["freed_kib"] > 0
    left = {r[0] for r in store.db.execute("SELECT linkedid FROM calls WHERE linkedid NOT LIKE '1790000000.%'")}
    assert left == {"old-waiting", "old-dead"}  # what waits and what an administrator must see stay
    assert [r[0] for r in store.db.execute("SELECT phone FROM routes")] == ["+79160000002"]
    after = os.path.getsize(store.path)
    assert after < before * 0.4, (before, after)  # freed pages given back to the file system
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # Nothing left to prune: a second run changes nothing.
    assert not any(store.prune(7 * DAY, 300, now=now).values())
    store.close()


def vm_steps(store: Store, run) -> int:
    """SQLite virtual-machine instructions `run()` costs on this store's connection: the work of
    the database, counted, not timed."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    store.db.set_progress_handler(tick, 10)
    try:
        run()
    finally:
        store.db.set_progress_handler(None, 10)
    return count[0] * 10


def one_call(store: Store, outbox: Outbox, lid: str) -> None:
    """What a call's steps do to the database: journal the register and deliver it, the card move
    and the finish with its recording and deliver them (the portal answers)."""
    me = outbox.owner
    store.start_call(lid, "incoming", "+79161234567", "", "101", dict(REGISTER, EXTERNAL_CALL_ID=lid), me, 2)
    outbox.deliver_keys([lid], Deadline(30))
    store.mark_answered(lid, "102")
    store.move_card(lid, ["102"], ["101"], ["102"], me, 2)
    outbox.deliver_keys([lid], Deadline(30))
    store.queue_finish(lid, dict(FINISH, USER_PHONE_INNER="102"), None, me, 2)
    outbox.deliver_keys([lid], Deadline(30))


def test_a_call_costs_the_same_at_100k_past_calls_as_on_an_empty_database(state_dir, emulator):
    store = Store(state_dir)
    outbox = Outbox(store, Bitrix24(WebhookAuth(emulator.webhook_url), timeout=10))
    one_call(store, outbox, "warm-up.1")  # caches (the employees' user ids) as in steady state
    empty = vm_steps(store, lambda: one_call(store, outbox, "1795900000.1"))
    past_calls(store.path, 100000, 6, time.time())  # within the retention: nothing to prune
    full = vm_steps(store, lambda: one_call(store, outbox, "1795900000.2"))
    assert emulator.calls and all(c["finished"] for c in emulator.calls.values())
    assert full <= empty * 1.10, (empty, full)
    store.close()


def test_the_service_prunes_the_history_off_the_call_path(tmp_path, emulator):
    pbx = ServicePBX(tmp_path, emulator.webhook_url)
    pbx.values["storage"]["retention_days"] = "2"
    store = Store(str(pbx.state_dir))
    past_calls(store.path, 300, 4, time.time())  # half of it older than two days
    store.close()
    pbx.start()
    try:
        end = time.monotonic() + 60
        while not [e for e in pbx.log() if e["event"] == "outbox_pruned"]:
            assert time.monotonic() < end, "the deliverer never pruned"
            time.sleep(0.05)
    finally:
        pbx.stop()
    (line,) = [e for e in pbx.log() if e["event"] == "outbox_pruned"]
    assert line["calls"] == 150 and line["entries"] == 450 and line["retention_days"] == 2
    db = sqlite3.connect(str(pbx.state_dir / "agi-bitrix.sqlite3"))
    assert db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 150
    db.close()


def test_a_small_database_made_before_pages_were_given_back_is_switched_over_at_the_first_prune(state_dir):
    from agi_bitrix.store import _SCHEMA

    path = Path(state_dir) / "agi-bitrix.sqlite3"
    old = sqlite3.connect(str(path))  # as an older version made it: no auto_vacuum
    old.execute("PRAGMA journal_mode = WAL")
    old.executescript(_SCHEMA)
    old.close()
    past_calls(path, 3000, 30, time.time())
    store = Store(state_dir)
    assert store.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    before = os.path.getsize(path)
    counts = store.prune(7 * DAY, 300)
    assert counts["calls"] == 3000 - 700 and counts["freed_kib"] > 0
    assert store.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # from now on: incremental
    assert os.path.getsize(path) < before * 0.5
    store.close()


def test_the_worker_on_the_shared_store_prunes_every_pbxs_history_once_per_prune_every(two_pbxs, emulator,
                                                                                       monkeypatch):
    """The shared store's history is every PBX's, and some of its deletes scan whole tables: a
    worker prunes it at its first pass and then once per PRUNE_EVERY (300 s), not at every pass."""
    import signal

    from agi_bitrix.commands import worker
    from agi_bitrix.shared.store import PgStore

    a, _ = two_pbxs
    prunes, passes = [], []
    prune = PgStore.prune

    def counted(self, *args, **kw):
        prunes.append(self.pbx)
        return prune(self, *args, **kw)

    one_pass = worker.one_pass

    def then_stop_after_three(*args, **kw):
        one_pass(*args, **kw)
        passes.append(1)
        if len(passes) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the worker's own handler: it stops after this pass

    monkeypatch.setattr(PgStore, "prune", counted)
    monkeypatch.setattr(worker, "one_pass", then_stop_after_three)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        res = a.admin("worker", "--interval", "0")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert res.returncode == 0, res.stderr
    assert len(passes) == 3 and prunes == ["office-a"]
