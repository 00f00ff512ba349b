"""The state database as the history grows: what a call costs it, and how large it gets.

A call's work in the database (journal the register, lease, mark sent, mark done; the card move;
the finish and its recording the same way: what the steps and the deliverer of one call do, with
fsync, on this machine's disk) is measured on an empty database and beside 10,000 and 100,000
past calls, as SQLite virtual-machine instructions (exact) and as wall time (median of 40 calls).
The sizes: the database holding that many past calls, and the same history spread over 30 days
after the deliverer's pruning keeps the last 7 ([storage] retention_days) and gives the pages
back. Run: .venv/bin/python bench/db_growth.py
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from typing import Tuple

from agi_bitrix.store import DONE, Mark, Store
from agi_bitrix.testing.traffic import DAY, FINISH, REGISTER_PARAMS, past_calls

CALLS = 40


def one_call(store: Store, lid: str) -> None:
    """The database work of one answered call with a card move and a recording."""
    store.start_call(lid, "incoming", "+79161234567", "", "101", dict(REGISTER_PARAMS, EXTERNAL_CALL_ID=lid), "s", 2)
    deliver(store, lid, "externalCall.x")
    store.mark_answered(lid, "102")
    store.move_card(lid, ["102"], ["101"], ["102"], "s", 2)
    deliver(store, lid)
    store.queue_finish(lid, dict(FINISH, USER_PHONE_INNER="102"), {"path": "/r.wav", "name": "r.wav"}, "s", 2)
    deliver(store, lid)


def deliver(store: Store, lid: str, call_id: str = "") -> None:
    entries = store.lease_calls("s", 30, keys=[lid], fill=False)
    store.mark_sending([e.id for e in entries])
    store.settle([Mark(e, DONE, call_id=call_id or None) for e in entries])
    store.release([lid], "s")


def cost(store: Store, tag: str) -> Tuple[int, float]:
    """(VM instructions of one call, median ms of one call)."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    store.db.set_progress_handler(tick, 1)
    one_call(store, f"{tag}.vm")
    store.db.set_progress_handler(None, 1)
    samples = []
    for n in range(CALLS):
        start = time.perf_counter()
        one_call(store, f"{tag}.{n}")
        samples.append(time.perf_counter() - start)
    return steps[0], statistics.median(samples) * 1000


def mib(path: str) -> float:
    return os.path.getsize(path) / (1 << 20)


def main() -> int:
    print("a call's work in the state database beside the history, and the database's size:")
    print("  past calls   VM instructions   ms per call (fsync)   vs empty   database   30 days of history pruned to 7")
    base = None
    for past in (0, 10_000, 100_000):
        folder = tempfile.mkdtemp(prefix="agi-bitrix-bench-")
        try:
            store = Store(folder)
            one_call(store, "warm-up")
            if past:
                past_calls(store.path, past, 6, time.time())  # all within the retention
            store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            vm, ms = cost(store, "now")
            base = base or (vm, ms)
            size = mib(str(store.path))
            store.close()
            shutil.rmtree(folder)
            os.mkdir(folder)
            store = Store(folder)
            pruned = "-"
            if past:
                past_calls(store.path, past, 30, time.time())
                started = time.perf_counter()
                counts = store.prune(7 * DAY, 300)
                took = time.perf_counter() - started
                pruned = (f"{mib(str(store.path)):6.1f} MiB ({counts['calls']} calls pruned in {took * 1000:.0f} ms, "
                          f"{counts['freed_kib'] / 1024:.1f} MiB given back)")
            store.close()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"  {past:10,d}   {vm:15,d}   {ms:19.2f}   {ms / base[1]:7.2f}x   {size:6.1f} MiB   {pruned}")
    print(f"  (a call's VM instructions at 100k past calls are {vm / base[0]:.2f}x those on an empty database)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
