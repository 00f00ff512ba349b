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
from pathlib import Path
from typing import Dict, List

from agi_bitrix.store import DONE, Mark, Store
from agi_bitrix.testing.traffic import DAY, FINISH, REGISTER_PARAMS, past_calls

CALLS = 100


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
    entries = store.lease_calls("s", 2, keys=[lid], fill=False)  # the lease the step wrote with them
    store.mark_sending(entries)
    store.settle([Mark(e, DONE, call_id=call_id or None) for e in entries])
    store.release([lid], "s")


def vm_steps(store: Store, tag: str) -> int:
    """SQLite virtual-machine instructions of one call: the database's work, counted."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    store.db.set_progress_handler(tick, 1)
    one_call(store, tag)
    store.db.set_progress_handler(None, 1)
    return steps[0]


def mib(path: Path) -> float:
    return os.path.getsize(path) / (1 << 20)


def pruned(past: int, folder: Path) -> str:
    """The same number of calls spread over 30 days, pruned to the last 7."""
    store = Store(str(folder))
    try:
        past_calls(store.path, past, 30, time.time())
        started = time.perf_counter()
        counts = store.prune(7 * DAY, 300)
        took = time.perf_counter() - started
        return (f"{mib(store.path):6.1f} MiB ({counts['calls']} calls pruned in {took * 1000:.0f} ms, "
                f"{counts['freed_kib'] / 1024:.1f} MiB given back)")
    finally:
        store.close()


def main() -> int:
    sizes = (0, 10_000, 100_000)
    root = Path(tempfile.mkdtemp(prefix="agi-bitrix-bench-"))
    try:
        stores = {}
        for past in sizes:
            (root / str(past)).mkdir()
            store = stores[past] = Store(str(root / str(past)))
            one_call(store, "warm-up")
            if past:
                past_calls(store.path, past, 6, time.time())  # all within the retention
            store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        vm = {past: vm_steps(store, "vm") for past, store in stores.items()}
        size = {past: mib(store.path) for past, store in stores.items()}
        # Interleaved, so that a busy moment of the machine falls on all three alike.
        samples: Dict[int, List[float]] = {past: [] for past in sizes}
        for n in range(CALLS):
            for past, store in stores.items():
                start = time.perf_counter()
                one_call(store, f"now.{n}")
                samples[past].append(time.perf_counter() - start)
        for store in stores.values():
            store.close()
        ms = {past: statistics.median(samples[past]) * 1000 for past in sizes}
        print("a call's work in the state database beside the history, and the database's size:")
        print("  past calls   VM instructions   ms per call (fsync)   vs empty   database   "
              "30 days of history pruned to 7")
        for past in sizes:
            (root / f"p{past}").mkdir()
            after = pruned(past, root / f"p{past}") if past else "-"
            print(f"  {past:10,d}   {vm[past]:15,d}   {ms[past]:19.2f}   {ms[past] / ms[0]:7.2f}x   "
                  f"{size[past]:6.1f} MiB   {after}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
