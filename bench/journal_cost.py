"""Added cost of the outbox journal per call step.

Every step writes its request to SQLite before sending and marks it done after: open the
database, queue (with its lease, one durable transaction), take the lease (already its own: a
read), mark sending and mark done (no fsync: a repeated register changes nothing), read back the
state. Measured in-process over many steps, and set against one whole `incoming` process measured
the way bench/agi_event.py does.
Run: .venv/bin/python bench/journal_cost.py [N]
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agi_event import whole_event_ms  # noqa: E402
from agi_bitrix.store import Store  # noqa: E402


def journal_ms(state_dir: str, n: int) -> float:
    samples = []
    register = {"USER_PHONE_INNER": "101", "PHONE_NUMBER": "+79161234567", "TYPE": 2,
                "CALL_START_DATE": "2026-11-21T10:00:00+03:00", "EXTERNAL_CALL_ID": "x"}
    for i in range(n):
        start = time.perf_counter()
        store = Store(state_dir)
        lid = f"1795000000.{i}"
        entry_id = store.start_call(lid, "incoming", "+79161234567", "", "101", register, "bench", 5.0)
        entry = store.lease_calls("bench", 5.0, keys=[lid], fill=False)[0]
        store.mark_sending([entry])
        store.mark_done(entry, f"externalCall.{i}")
        store.entry_states([entry_id])
        store.call(lid)
        store.close()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory() as tmp:
        cost = journal_ms(os.path.join(tmp, "state"), n)
    whole = whole_event_ms(runs=10)
    print(f"outbox journal per call step (median of {n}, open + queue + lease + sending + done):")
    print(f"  {cost:6.2f} ms per step, {cost / whole * 100:4.1f}% of a whole `incoming` event ({whole:.0f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
