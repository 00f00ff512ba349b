"""Delivery at the portal's pace: requests per call, calls per minute sustained, backlog drain.

The emulator enforces the Bitrix24 cloud's leaky bucket (a burst of 50, then 2 requests per
second) and the service's own deliverer sends to it (agi_bitrix/testing/traffic.py), all on a
clock the bench moves: the figures are in the portal's seconds, the same on any machine. Each
figure is set beside the same run with one command per request (how the outbox delivered before
batches), the baseline.

- steady traffic: answered calls with a recording (downloaded by the portal from
  [calls] recording_url), 3 minutes at a given rate: REST requests per call, 503 answers, the
  delay from `incoming` to the register at the portal (the card pops up), what still waited
  when the calls stopped;
- a backlog: 10,000 waiting entries (5,000 calls missed during an outage), alone and while
  calls go on at 60 a minute.
Run: .venv/bin/python bench/delivery.py
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from typing import Any, Dict, List

from agi_bitrix.store import PENDING
from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from agi_bitrix.testing.traffic import PBX, START, Recordings, p95, traffic


def portal() -> Bitrix24Emulator:
    emu = Bitrix24Emulator(webhook_code="bench-webhook").start()
    emu.add_user("Anna", "Operator", inner="101")
    return emu


def steady(per_minute: float, one_per_request: bool = False, inline: bool = False) -> Dict[str, Any]:
    """Three minutes of answered calls with recordings at `per_minute`."""
    emu, rec, folder = portal(), Recordings(), tempfile.mkdtemp(prefix="agi-bitrix-bench-")
    try:
        pbx = PBX(folder, emu, "" if inline else rec.url)
        if one_per_request:
            pbx.courier.batch = pbx.courier.live_batch = 1
        calls = int(per_minute * 3)
        events = traffic(calls, per_minute)
        last = max(at for at, _, _ in events)
        pbx.run(events, until_idle=False, limit=last + 600)
        waiting = len(pbx.store.entries(state=PENDING))
        stopped = pbx.clock()
        pbx.run([], until_idle=True, limit=3 * 3600)
        delays = pbx.card_delays()
        return {"rate": per_minute, "calls": calls, "requests": len(pbx.http_requests()) / calls,
                "503": emu.count_503, "p50": statistics.median(delays), "p95": p95(delays),
                "waiting": waiting, "catch_up": pbx.clock() - stopped}
    finally:
        emu.stop()
        rec.close()
        shutil.rmtree(folder, ignore_errors=True)


def backlog(calls: int, live_per_minute: float = 0.0, one_per_request: bool = False) -> Dict[str, Any]:
    """`calls` missed calls journaled during an outage (register and finish each), then delivered."""
    emu, rec, folder = portal(), Recordings(), tempfile.mkdtemp(prefix="agi-bitrix-bench-")
    try:
        pbx = PBX(folder, emu, rec.url)
        if one_per_request:
            pbx.courier.batch = pbx.courier.live_batch = 1
        for n in range(calls):
            lid = f"1797000000.{n}"
            pbx.incoming(lid, submit=False)
            pbx.hangup(lid, record=False, submit=False)
        pbx.arrived.clear()
        live = traffic(int(live_per_minute * 3), live_per_minute, start=1.0) if live_per_minute else []
        wall = time.perf_counter()
        pbx.run(live, until_idle=True, limit=6 * 3600)
        wall = time.perf_counter() - wall
        done = [at for lid, at in emu.call_facts("external_call_id", "finished_at") if lid.startswith("1797000000.")]
        delays = pbx.card_delays()
        return {"entries": 2 * calls, "drained": max(done) - START, "requests": len(pbx.http_requests()),
                "503": emu.count_503, "p95": p95(delays) if delays else 0.0, "wall": wall}
    finally:
        emu.stop()
        rec.close()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    print("steady traffic, 3 minutes of answered calls with a recording, portal bucket burst 50 / 2 per s:")
    print("  calls/min  delivery                requests/call  503s  card delay p50/p95   "
          "waiting at the end  caught up")
    rows: List[Dict[str, Any]] = []
    for rate in (40, 60, 100, 120, 150, 200, 300):
        for label, kw in (("batches", {}), ("one per request", {"one_per_request": True})):
            if kw and rate > 60:
                continue  # the baseline cannot keep up beyond 40 a minute: its backlog only grows
            r = steady(rate, **kw)
            rows.append(r)
            print(f"  {rate:9.0f}  {label:22s}  {r['requests']:13.2f}  {r['503']:4d}  {r['p50']:5.2f} / "
                  f"{r['p95']:5.2f} s  {r['waiting']:18d}  {r['catch_up']:6.0f} s")
    r = steady(100, inline=True)
    print(f"  {100:9.0f}  {'inline recordings':22s}  {r['requests']:13.2f}  {r['503']:4d}  {r['p50']:5.2f} / "
          f"{r['p95']:5.2f} s  {r['waiting']:18d}  {r['catch_up']:6.0f} s")
    print()
    print("a backlog after an outage (missed calls: register and finish each), portal bucket burst 50 / 2 per s:")
    base = backlog(500, one_per_request=True)
    alone = backlog(5000)
    print(f"  {base['entries']:6d} entries, one per request: {base['drained']:6.0f} s, {base['requests']} requests"
          f"  ({base['drained'] / base['entries'] * 10000 / 60:.0f} min for 10,000)")
    print(f"  {alone['entries']:6d} entries, batches:         {alone['drained']:6.0f} s, {alone['requests']} requests"
          f"  ({base['drained'] / base['entries'] / (alone['drained'] / alone['entries']):.0f}x faster per entry;"
          f" {alone['wall']:.1f} s of this machine's time)")
    live = backlog(5000, live_per_minute=60)
    print(f"  {live['entries']:6d} entries while 60 calls a minute go on: drained in {live['drained']:.0f} s, "
          f"card delay p95 {live['p95']:.2f} s, 503s {live['503']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
