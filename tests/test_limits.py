"""Portal limits through the real entry point: the leaky bucket (503 QUERY_LIMIT_EXCEEDED), the
PBX-wide rate budget shared by concurrent call steps, and 429 OPERATION_TIME_LIMIT."""
from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import List

from conftest import SHORT_BUDGET

REGISTER = "telephony.externalcall.register"


def burst_of_incoming(pbx, prefix: str, count: int) -> List:
    lids = [f"{prefix}.{i}" for i in range(count)]
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda lid: pbx.run(["incoming", "89161234567", "74951234567"], linkedid=lid,
                                                 timeout=120), lids))


def assert_each_call_once(emulator, prefix: str, count: int) -> None:
    registered = Counter(c["external_call_id"] for c in emulator.calls.values())
    assert registered == Counter(f"{prefix}.{i}" for i in range(count))  # none missing, none twice
    good = [r for r in emulator.requests_for(REGISTER) if r["status"] == 200]
    assert len(good) == count


def advance_budget(pbx, seconds: float) -> None:
    """The PBX's clock moves on: every time the shared request budget recorded is `seconds` earlier."""
    path = next(pbx.state_dir.glob("ratelimit-*.json"))
    state = json.loads(path.read_text())
    state["at"] -= seconds
    for table in ("reset", "blocked"):
        state[table] = {method: at - seconds for method, at in state.get(table, {}).items()}
    path.write_text(json.dumps(state))


def test_burst_of_calls_within_a_budget_that_mirrors_the_portal(pbx, emulator):
    emulator.set_bucket(6, drain_per_second=2)
    # The administrator told the PBX its portal's bucket (a bit under it: two requests, a second of
    # a process's delay on a loaded machine), and gave call steps a budget long enough to wait
    # their turn: 12 requests at 2/s after a burst of 4 take ~4 s. Without the shared budget the
    # dozen requests (3 s of process starts at most) overflow the bucket of 6.
    pbx.set("bitrix24", "rate_burst", "4")
    pbx.set("bitrix24", "rate_per_second", "2")
    pbx.set("bitrix24", "timeout", "60")
    runs = burst_of_incoming(pbx, "1795600000", 12)
    assert [r.set_variables.get("BITRIX_STATUS") for r in runs] == ["OK"] * 12
    assert_each_call_once(emulator, "1795600000", 12)
    assert emulator.count_503 == 0  # the shared budget queued the burst: the portal never refused
    waited = [e for e in pbx.log() if e["event"] == "incoming"]
    print(f"\nmirrored budget: 12 calls, {emulator.count_503} answers 503, "
          f"{len(emulator.requests_for(REGISTER))} register requests, "
          f"slowest step {max(e['ms'] for e in waited)} ms")


def test_burst_of_calls_against_a_smaller_bucket_backs_off(pbx, emulator):
    emulator.set_bucket(2, drain_per_second=5)
    # The portal's clock moves 0.14 s per request it receives (its bucket drains 0.7 per request),
    # whatever the speed of this machine: the 5th request overflows a bucket of 2, so 503s are
    # certain, and every retry drains it again, so all calls get through.
    start = time.time()
    emulator.clock = lambda: start + 0.14 * emulator.request_count
    # The PBX believes in the default burst of 40: the portal's 503s make every process back off
    # (and mark the shared budget full) until all 8 got through, each exactly once.
    pbx.set("bitrix24", "rate_per_second", "5")
    pbx.set("bitrix24", "timeout", "60")
    runs = burst_of_incoming(pbx, "1795600100", 8)
    assert [r.set_variables.get("BITRIX_STATUS") for r in runs] == ["OK"] * 8
    assert_each_call_once(emulator, "1795600100", 8)
    assert emulator.count_503 > 0  # the portal really pushed back
    print(f"\nbudget above the bucket: 8 calls, {emulator.count_503} answers 503 (all retried), "
          f"{len(emulator.requests_for(REGISTER))} register requests")


def test_beyond_the_budget_the_step_is_queued_not_sent(pbx, emulator):
    pbx.set("bitrix24", "rate_burst", "1")
    pbx.set("bitrix24", "rate_per_second", "0.01")  # the next slot is 100 s away
    assert pbx.run(["incoming", "89161234567"], linkedid="1795600200.1").set_variables["BITRIX_STATUS"] == "OK"
    pbx.set("bitrix24", "timeout", SHORT_BUDGET)
    run = pbx.run(["incoming", "89031112233"], linkedid="1795600200.2")
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "QUEUED"
    assert "request budget" in pbx.log()[-1]["reason"]
    assert len(emulator.requests_for(REGISTER)) == 1  # nothing was sent to be refused


def test_429_is_respected_until_operating_reset_at(pbx, emulator):
    # The method is close to its execution-time limit: good answers announce when part of it
    # frees (time.operating_reset_at, ten minutes from now: longer than any step takes on a loaded
    # machine); then the portal blocks it until then.
    reset_at = int(time.time()) + 600
    emulator.set_operating_reset(REGISTER, reset_at)
    assert pbx.run(["incoming", "89161234567"], linkedid="1795600300.1").set_variables["BITRIX_STATUS"] == "OK"
    emulator.set_operating_limit(REGISTER, reset_at)

    run = pbx.run(["incoming", "89031112233"], linkedid="1795600300.2")
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "QUEUED"
    assert "OPERATION_TIME_LIMIT" in json.dumps(pbx.log()[-1])
    assert [r["status"] for r in emulator.requests_for(REGISTER)] == [200, 429]
    state = json.loads(next(pbx.state_dir.glob("ratelimit-*.json")).read_text())
    assert state["blocked"][REGISTER] == reset_at  # the 429 itself carries no time: remembered

    # Every other process holds the method back on its own, without asking the portal.
    run = pbx.run(["incoming", "89031112244"], linkedid="1795600300.3")
    assert run.set_variables["BITRIX_STATUS"] == "QUEUED"
    assert "held back until" in json.dumps(pbx.log()[-1])
    assert len(emulator.requests_for(REGISTER)) == 2

    # Ten minutes pass, on the portal's clock and on the PBX's: past operating_reset_at the method is free.
    start = time.time()
    emulator.clock = lambda: time.time() - start + reset_at + 1
    advance_budget(pbx, reset_at + 1 - start)
    run = pbx.run(["incoming", "89031112255"], linkedid="1795600300.4")
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert [r["status"] for r in emulator.requests_for(REGISTER)][-1] == 200
