"""Delivery at the portal's pace: batches across calls, live calls first, per-command outcomes.

The portal here is the emulator enforcing the cloud's leaky bucket (a burst of 50, then 2 per
second) on a clock the test moves, and the deliverer is the service's own (service/courier.py,
outbox.py) driven on the same clock: minutes of traffic take a few seconds, on any machine.
"""
from __future__ import annotations

import heapq
import os
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from agi_bitrix.bitrix.auth import WebhookAuth
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.outbox import Outbox
from agi_bitrix.service.courier import Courier, is_urgent
from agi_bitrix.store import DEAD, DONE, PENDING, Store
from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator

START = 1_800_000_000.0
BUDGET = 2.0  # [bitrix24] timeout: what a step waits for its delivery
REGISTER = "telephony.externalcall.register"


class Clock:
    """The time of the portal, the request budget and the deliverer: it moves when the test says."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class Recordings(ThreadingHTTPServer):
    """Where the portal downloads the recordings from ([calls] recording_url)."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = b"RIFF-recording"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/rec/{{name}}"


@pytest.fixture
def state_dir() -> Iterator[str]:
    """The database on tmpfs when there is one: thousands of journal writes without an fsync each
    (the durability is not what these tests are about)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix="agi-bitrix-delivery-", dir=base)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def recordings() -> Iterator[Recordings]:
    server = Recordings()
    yield server
    server.shutdown()
    server.server_close()


class PBX:
    """The service's journal and deliverer against the emulator, on one clock."""

    def __init__(self, state_dir: str, emulator: Bitrix24Emulator, recording_url: str = "",
                 window: float = 0.3) -> None:
        self.clock = Clock()
        self.emulator = emulator
        emulator.clock = self.clock
        emulator.set_bucket(50, drain_per_second=2.0)
        self.store = Store(state_dir)
        self.limiter = RateLimiter(state_dir, "portal", burst=40, per_second=2.0, clock=self.clock,
                                   sleep=self.clock.advance)
        client = Bitrix24(WebhookAuth(emulator.webhook_url), timeout=10, limiter=self.limiter)
        self.courier = Courier(lambda: window, clock=self.clock)
        self.outbox = Outbox(self.store, client, recording_url, owner=self.courier.owner)
        self.arrived: Dict[str, float] = {}  # linkedid -> when its `incoming` step journaled
        self.recording = Path(state_dir) / "rec.wav"
        self.recording.write_bytes(b"RIFF-recording")
        os.utime(self.recording, (1, 1))  # long finished

    # -- the call steps, as the controllers journal them ---------------------------------------------
    def submit(self, lid: str) -> None:
        roomy = self.limiter.room() > self.limiter.burst // 2
        self.courier.submit([lid], is_urgent(self.store, [lid]), BUDGET, roomy)

    def incoming(self, lid: str, submit: bool = True) -> None:
        register = {"USER_PHONE_INNER": "101", "PHONE_NUMBER": "+7916" + lid[-7:].replace(".", "0"),
                    "TYPE": 2, "CALL_START_DATE": "2026-11-21T10:00:00+03:00", "CRM_CREATE": 0,
                    "EXTERNAL_CALL_ID": lid, "SHOW": 1}
        self.store.start_call(lid, "incoming", register["PHONE_NUMBER"], "", "101", register,
                              self.courier.owner, BUDGET + 5)
        self.arrived[lid] = self.clock()
        if submit:
            self.submit(lid)

    def hangup(self, lid: str, record: bool = True, submit: bool = True) -> None:
        finish = {"USER_PHONE_INNER": "101", "DURATION": 30 if record else 0, "STATUS_CODE": "200" if record else "304"}
        rec = {"path": str(self.recording), "name": f"{lid}.wav"} if record else None
        self.store.queue_finish(lid, finish, rec, self.courier.owner, BUDGET + 5)
        if submit:
            self.submit(lid)

    # -- time -------------------------------------------------------------------------------------------
    def run(self, events: List[Tuple[float, str, str]], until_idle: bool = True, limit: float = 3600) -> None:
        """Play the calls' steps at their times while the deliverer does what is due, the clock
        jumping from one moment something happens to the next."""
        heap = [(START + at, n, kind, lid) for n, (at, kind, lid) in enumerate(events)]
        heapq.heapify(heap)
        while self.clock() < START + limit:
            wait = self.courier.step(self.outbox, 5.0)
            if wait <= 0:
                continue
            if not heap and not self.courier.waiting() and not (until_idle and self.store.entries(state=PENDING)):
                return
            at = min(heap[0][0] if heap else float("inf"), self.clock() + wait)
            self.clock.advance(at - self.clock())
            while heap and heap[0][0] <= self.clock():
                _, _, kind, lid = heapq.heappop(heap)
                getattr(self, kind)(lid)
        raise AssertionError("the deliverer never caught up")

    # -- what the portal saw ------------------------------------------------------------------------------
    def card_delays(self) -> List[float]:
        """Seconds from each call's `incoming` to its register at the portal (the card pops up)."""
        seen: Dict[str, float] = {}
        for method, _, at, _, lid in self.emulator.request_facts("EXTERNAL_CALL_ID"):
            if method == REGISTER:
                seen.setdefault(lid, at)
        return sorted(seen[lid] - at for lid, at in self.arrived.items() if lid in seen)

    def http_requests(self) -> List[Tuple[str, float, Any]]:
        """(method, time, commands) of each HTTP request (a batch's commands are not requests)."""
        return [(method, at, cmd) for method, batch, at, _, cmd in self.emulator.request_facts("cmd") if not batch]


def p95(values: List[float]) -> float:
    return values[int(round(0.95 * (len(values) - 1)))]


def traffic(calls: int, per_minute: float, start: float = 0.0, prefix: str = "1796000000") -> List[Tuple[float, str, str]]:
    """`calls` answered calls with recordings, one every 60/per_minute s, each talking 20-80 s."""
    events = []
    for n in range(calls):
        at = start + n * 60.0 / per_minute
        lid = f"{prefix}.{n}"
        events += [(at, "incoming", lid), (at + 20 + (n * 37) % 60, "hangup", lid)]
    return events


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
    assert requests[0][1] == pytest.approx(START + 0.3)  # the first one's window, no longer
    assert requests[1][1] == pytest.approx(START + 5.3)  # alone: it waited its window for nobody
    assert len(emulator.calls) == 4


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
