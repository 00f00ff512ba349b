"""Delivery at the portal's pace: batches across calls, live calls first, per-command outcomes.

The portal here is the emulator enforcing the cloud's leaky bucket (a burst of 50, then 2 per
second) on a clock the test moves, and the deliverer is the service's own (service/courier.py,
outbox.py) driven on the same clock: minutes of traffic take a few seconds, on any machine.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import pytest
from conftest import ServicePBX, only_call

from agi_bitrix.bitrix.auth import WebhookAuth
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.outbox import Outbox
from agi_bitrix.store import DEAD, DONE, PENDING, Store
from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from agi_bitrix.testing.traffic import PBX, REGISTER, START, Clock, Recordings, p95, traffic


@pytest.fixture
def state_dir(fast_dir) -> str:
    return fast_dir


@pytest.fixture
def recordings() -> Iterator[Recordings]:
    server = Recordings()
    yield server
    server.close()


# ----------------------------------------------------------------------------------- steady traffic

def test_100_calls_a_minute_for_three_minutes_with_recordings(state_dir, emulator, recordings):
    pbx = PBX(state_dir, emulator, recordings.url)
    pbx.run(traffic(300, 100))
    calls = emulator.call_facts("finished", "record", "register_count")
    assert len(calls) == 300 and all(finished and record is not None for finished, record, _ in calls)
    assert all(count == 1 for _, _, count in calls)  # nothing sent twice
    assert emulator.count_503 == 0
    delays = pbx.card_delays()
    assert len(delays) == 300 and p95(delays) <= 1.0, delays[-20:]
    # The register, finish and recording of each call, in well under 1.5 requests per call.
    assert len(pbx.http_requests()) <= 1.5 * 300
    assert pbx.store.outbox_status()["counts"] == {PENDING: 0, DONE: 900, DEAD: 0}


def test_registers_wait_at_most_the_window_and_calls_arriving_together_share_a_request(state_dir, emulator):
    pbx = PBX(state_dir, emulator, window=0.3)
    events = [(0.0, "incoming", "1796100000.1"), (0.1, "incoming", "1796100000.2"),
              (0.2, "incoming", "1796100000.3"), (5.0, "incoming", "1796100000.4")]
    pbx.run(events, until_idle=False, limit=10)
    requests = pbx.http_requests()
    assert [method for method, _, _ in requests] == ["batch", REGISTER]
    assert list(requests[0][2]) == ["r1", "r2", "r3"]
    assert requests[0][1] - START == pytest.approx(0.3)  # the first one's window, no longer
    assert requests[1][1] - START == pytest.approx(5.3)  # alone: it waited its window for nobody
    assert len(emulator.calls) == 4


def test_as_many_registers_as_a_request_carries_go_at_once_without_waiting_out_the_window(state_dir, emulator):
    pbx = PBX(state_dir, emulator, window=0.3)
    assert pbx.courier.live_batch == 10
    events = [(n / 100, "incoming", f"1796100100.{n}") for n in range(11)]  # one every 10 ms
    pbx.run(events, until_idle=False, limit=10)
    requests = pbx.http_requests()
    assert [method for method, _, _ in requests] == ["batch", REGISTER]
    assert len(requests[0][2]) == 10
    assert requests[0][1] - START == pytest.approx(0.09)  # the tenth filled it: nobody waited longer
    assert requests[1][1] - START == pytest.approx(0.4)  # the eleventh: its own window
    assert len(emulator.calls) == 11


# ----------------------------------------------------------------------------------- after an outage

def test_a_10000_entry_backlog_drains_in_full_batches_while_live_calls_go_first(state_dir, emulator, recordings):
    pbx = PBX(state_dir, emulator, recordings.url)
    for n in range(5000):  # an outage: 5,000 missed calls, register and finish each, nobody delivered
        lid = f"1796200000.{n}"
        pbx.incoming(lid, submit=False)
        pbx.hangup(lid, record=False, submit=False)
    assert pbx.store.outbox_status()["counts"][PENDING] == 10000
    pbx.arrived.clear()
    # The portal is back; calls go on at 60 a minute while the deliverer drains the backlog.
    pbx.run(traffic(180, 60, start=1.0), until_idle=True)
    old = [(finished, at) for lid, finished, at in emulator.call_facts("external_call_id", "finished", "finished_at")
           if lid.startswith("1796200000.")]
    assert len(old) == 5000 and all(finished for finished, _ in old)
    backlog_done = max(at for _, at in old) - START
    assert backlog_done <= 300, f"the backlog took {backlog_done:.0f} s"
    delays = pbx.card_delays()
    assert len(delays) == 180 and p95(delays) <= 1.0, delays[-20:]  # live cards never waited behind it
    assert emulator.count_503 == 0
    batches = [cmd for method, _, cmd in pbx.http_requests() if method == "batch"]
    assert sum(len(cmd) == 50 for cmd in batches) >= 150  # full batches: 10,000 / 50
    assert pbx.store.outbox_status()["counts"][PENDING] == 0


# ----------------------------------------------------------------------------------- one batch, many outcomes

class Journal:
    """Calls journaled as the steps do, delivered by `outbox flush`'s rounds (real time, no bucket)."""

    def __init__(self, state_dir: str, emulator: Bitrix24Emulator, recording_url: str = "") -> None:
        self.store = Store(state_dir)
        self.limiter = RateLimiter(state_dir, "portal", burst=40, per_second=2.0)
        self.outbox = Outbox(self.store, Bitrix24(WebhookAuth(emulator.webhook_url), timeout=10,
                                                  limiter=self.limiter), recording_url)
        self.recording = Path(state_dir) / "rec.wav"
        self.recording.write_bytes(b"RIFF-recording")
        os.utime(self.recording, (1, 1))

    def call(self, lid: str, user: str = "101", finish_user: Optional[str] = None, card: Optional[Dict] = None,
             record: Optional[str] = None, ended: bool = True) -> Dict[str, int]:
        """register [card] [finish [record]] of one call: the ids of its entries by kind."""
        register = {"USER_PHONE_INNER": user, "PHONE_NUMBER": "+79160000" + lid[-3:], "TYPE": 2,
                    "CALL_START_DATE": "2026-11-21T10:00:00+03:00", "EXTERNAL_CALL_ID": lid, "SHOW": 0}
        ids = {"register": self.store.start_call(lid, "incoming", register["PHONE_NUMBER"], "", user, register, "x", 0)}
        if card is not None:
            ids["card"] = self.store.move_card(lid, card.get("show", []), card.get("hide", []), [], "x", 0)
        if not ended:
            return ids
        rec = {"path": str(self.recording), "name": record} if record else None
        finish = {"USER_PHONE_INNER": finish_user or user, "DURATION": 7, "STATUS_CODE": "200"}
        more = self.store.queue_finish(lid, finish, rec, "x", 0)
        ids["finish"] = more[0]
        if rec:
            ids["record"] = more[1]
        return ids

    def states(self, ids: Dict[str, int]) -> Dict[str, Tuple[str, Optional[str]]]:
        found = self.store.entry_states(list(ids.values()))
        return {kind: (found[i].state, found[i].last_error) for kind, i in ids.items()}


def test_one_batch_with_mixed_failures_settles_each_entry_by_its_own_answer(state_dir, emulator, recordings):
    box = Journal(state_dir, emulator, recordings.url.replace("/rec/", "/missing/"))
    emulator.add_user("Gone", "Man", inner="199", active=False)
    emulator.set_operating_limit("telephony.externalcall.show", time.time() + 120)  # 429 for show
    nobody = box.call("1796300000.001", user="555")                                # no such employee
    limited = box.call("1796300000.002", card={"show": ["102"]}, ended=False)      # its show gets a 429
    unknown = box.call("1796300000.003", card={"hide": ["199"]})                   # no active employee 199
    bad_finish = box.call("1796300000.004", finish_user="555", record="r4.wav")    # the finish is refused
    fine = box.call("1796300000.005")
    stats = box.outbox.flush()
    (request,) = [r for r in emulator.requests if not r["batch"]]  # all five calls in one request
    assert request["method"] == "batch" and len(request["params"]["cmd"]) == 14

    assert box.states(nobody) == {"register": ("dead", "telephony.externalcall.register: HTTP 400 ERROR_CORE "
                                               "(User is not found or is not active)"),
                                  "finish": ("dead", f"waits for the dead-lettered register #{nobody['register']}")}
    got = box.states(limited)
    assert got["register"] == ("done", None)
    assert got["card"][0] == "pending" and "OPERATION_TIME_LIMIT" in got["card"][1]
    # The 429 holds show back for every deliverer of this PBX until the portal frees it.
    assert "telephony.externalcall.show" in box.limiter.blocked_methods()
    got = box.states(unknown)
    assert got["card"] == ("dead", "user.get: USER_NOT_FOUND (no active employee has inner number 199)")
    assert got["finish"] == ("done", None)
    got = box.states(bad_finish)
    assert got["finish"][0] == "dead" and "User is not found" in got["finish"][1]
    # attachRecord failed because its finish did: waiting, not a dead letter of its own.
    assert got["record"][0] == "pending" and "not finished yet" in got["record"][1]
    assert box.states(fine) == {"register": ("done", None), "finish": ("done", None)}
    assert (stats.delivered, stats.dead) == (6, 4)

    # Nothing marked delivered that the portal did not do, nothing done twice.
    calls = {c["external_call_id"]: c for c in emulator.calls.values()}
    assert set(calls) == {"1796300000.002", "1796300000.003", "1796300000.004", "1796300000.005"}
    assert [calls[lid]["finished"] for lid in sorted(calls)] == [False, True, False, True]
    assert calls["1796300000.002"]["shown"] == []  # the show refused with a 429 did nothing
    assert all(c["register_count"] == 1 for c in calls.values())

    # The next flush does not knock on show while the portal holds it back, and says so.
    again = box.outbox.flush()
    assert again.requests == 0
    held = [g for g in again.groups if g["text"].startswith("telephony.externalcall.show: held back until")]
    assert [g["count"] for g in held] == [1]


@pytest.mark.parametrize("answer", ["cut", "not json", "no results"])
def test_an_odd_batch_answer_loses_nothing_and_repeats_nothing(state_dir, emulator, recordings, answer):
    box = Journal(state_dir, emulator, recordings.url)
    ids = [box.call(f"1796400000.00{n}", record=f"r{n}.wav") for n in range(3)]
    body = {"cut": '{"result": {"result": {"r1": {"CALL_ID": "exter', "not json": "<html>Bad Gateway</html>",
            "no results": '{"result": {"result": [], "result_error": []}, "time": {}}'}[answer]
    emulator.fail_next(200, "", method="batch", body=body, after=True)  # the portal did the work
    first = box.outbox.flush()
    assert (first.delivered, first.dead) == (0, 0) and first.waiting == 9
    for entry in ids:  # each may have been sent: a finish repeat answered "not found" is finished
        assert all(state == "pending" for state, _ in box.states(entry).values())
        assert all(box.store.entry_states([i])[i].sending_at is not None for i in entry.values())
    second = box.outbox.flush()
    assert (second.delivered, second.dead, second.waiting) == (9, 0, 0)
    calls = list(emulator.calls.values())
    assert len(calls) == 3 and all(c["finished"] and c["record"] is not None for c in calls)
    assert [len(emulator.requests_for("telephony.externalcall.finish"))] == [6]  # the repeat, answered not found
    assert sum(c["register_count"] for c in calls) == 6  # the repeat found the same call (EXTERNAL_CALL_ID)


def test_a_reference_to_a_register_that_failed_leaves_the_entries_behind_it_untouched(state_dir, emulator):
    box = Journal(state_dir, emulator)
    emulator.set_operating_limit(REGISTER, time.time() + 60)
    ids = box.call("1796500000.001", card={"show": ["102"]}, ended=False)
    stats = box.outbox.flush()
    assert stats.requests == 1 and (stats.delivered, stats.dead) == (0, 0)
    got = box.states(ids)
    assert got["register"][0] == "pending" and "OPERATION_TIME_LIMIT" in got["register"][1]
    for kind in ("card",):  # it named a CALL_ID that never came: it did nothing
        assert got[kind][0] == "pending" and got[kind][1].startswith("waits for its register")
        assert box.store.entry_states([ids[kind]])[ids[kind]].sending_at is None
    assert emulator.calls == {}
    emulator.set_operating_limit(REGISTER, None)
    box.limiter.path.unlink()  # the portal freed it
    assert box.outbox.flush().delivered == 2
    assert only_call(emulator)["shown"] == [emulator.people["102"]]


# ----------------------------------------------------------------------------------- through the service

def test_the_service_sends_the_registers_of_calls_arriving_together_in_one_request(tmp_path, emulator):
    pbx = ServicePBX(tmp_path, emulator.webhook_url)
    pbx.values["service"]["batch_window"] = "0.3"
    pbx.start()
    try:
        courier = pbx.service.courier
        wait(lambda: courier.next_pass > 0, "the service's first pass")
        clock = Clock(time.monotonic())  # the courier's clock stands still until the test moves it
        courier.clock = clock
        lids = [f"1796600000.{n}" for n in range(3)]
        runs: Dict[str, Any] = {}
        steps = [threading.Thread(target=lambda lid=lid: runs.__setitem__(
            lid, pbx.run(["incoming", "8916123450" + lid[-1]], linkedid=lid))) for lid in lids]
        for step in steps:
            step.start()
        wait(lambda: courier.waiting() == 3, "the three steps to hand their calls over")
        sent = lambda: [r for r in emulator.requests if not r["batch"] and r["method"] != "scope"]  # noqa: E731
        assert sent() == []  # each waits for the others within the window (`scope`: the health probe)
        clock.advance(0.3)
        courier.wake()
        for step in steps:
            step.join(60)
        assert [runs[lid].set_variables["BITRIX_STATUS"] for lid in lids] == ["OK"] * 3
        by_lid = {c["external_call_id"]: c["CALL_ID"] for c in emulator.calls.values()}
        assert [runs[lid].set_variables["BITRIX_CALL_ID"] for lid in lids] == [by_lid[lid] for lid in lids]
        (request,) = sent()
        assert request["method"] == "batch" and sorted(request["params"]["cmd"]) == ["r1", "r2", "r3"]
    finally:
        pbx.stop()


def test_a_call_handed_over_as_the_courier_goes_to_sleep_waits_its_window_not_the_next_pass():
    from agi_bitrix.service.courier import Courier

    clock = Clock(1000.0)
    courier = Courier(window=lambda: 0.3, clock=clock)
    # step() found nothing to send and worked out its pause: an hour to the next pass. A step hands
    # its register over before the pause begins (its wake-up call comes too early to be heard).
    courier.submit(["1796600100.1"], urgent=True, budget=30.0)
    pause = threading.Thread(target=courier.sleep, args=(3600.0,), daemon=True)
    pause.start()
    pause.join(60)
    try:
        assert not pause.is_alive(), "the courier slept past the register's window"
    finally:
        courier.wake()


def wait(condition: Any, what: str, limit: float = 60.0) -> None:
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)
