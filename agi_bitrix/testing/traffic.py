"""Call traffic played against the Bitrix24 emulator through the service's deliverer, on a clock
the caller moves: minutes of calls at the portal's pace in a few seconds of any machine.

The emulator enforces the cloud's leaky bucket (a burst of 50, then 2 per second) on that clock;
the PBX side is the real journal (store.py), the real deliverer (service/courier.py, outbox.py)
and the real PBX-wide request budget (ratelimit.py), all on the same clock. The call steps are
played as their controllers journal them (register at `incoming`, finish and recording at
`hangup`) and hand their calls to the deliverer as the service's steps do. Used by the tests and
by bench/delivery.py.
"""
from __future__ import annotations

import heapq
import json
import os
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Tuple

from agi_bitrix.bitrix.auth import WebhookAuth
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.bitrix.payloads import REGISTER
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.outbox import Outbox
from agi_bitrix.service.courier import Courier, is_urgent, roomy
from agi_bitrix.store import PENDING, Store
from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator

START = 1_800_000_000.0
BUDGET = 2.0  # [bitrix24] timeout: what a step waits for its delivery

Event = Tuple[float, str, str]  # (seconds after START, "incoming" | "hangup", linkedid)
DAY = 86400.0
REGISTER_PARAMS = {"USER_PHONE_INNER": "101", "PHONE_NUMBER": "+79161234567", "TYPE": 2,
                   "CALL_START_DATE": "2026-11-21T10:00:00+03:00", "CRM_CREATE": 1, "SHOW": 1}
FINISH = {"USER_PHONE_INNER": "101", "DURATION": 42, "STATUS_CODE": "200", "ADD_TO_CHAT": 1}


class Clock:
    """The time of the portal, the request budget and the deliverer: it moves when told."""

    def __init__(self, start: float = START) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class Recordings(ThreadingHTTPServer):
    """Where the portal downloads the recordings from ([calls] recording_url)."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
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

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class PBX:
    """The service's journal and deliverer against the emulator, on one clock."""

    def __init__(self, state_dir: str, emulator: Bitrix24Emulator, recording_url: str = "",
                 window: float = 0.3, burst: int = 40, per_second: float = 2.0) -> None:
        self.clock = Clock()
        self.emulator = emulator
        emulator.clock = self.clock
        emulator.set_bucket(50, drain_per_second=2.0)
        self.store = Store(state_dir)
        self.limiter = RateLimiter(state_dir, "portal", burst=burst, per_second=per_second, clock=self.clock,
                                   sleep=self.clock.advance)
        client = Bitrix24(WebhookAuth(emulator.webhook_url), timeout=10, limiter=self.limiter)
        self.courier = Courier(lambda: window, clock=self.clock)
        self.outbox = Outbox(self.store, client, recording_url, owner=self.courier.owner, clock=self.clock)
        self.arrived: Dict[str, float] = {}  # linkedid -> when its `incoming` step journaled
        self.recording = Path(state_dir) / "rec.wav"
        self.recording.write_bytes(b"RIFF-recording")
        os.utime(self.recording, (1, 1))  # long finished

    # -- the call steps, as the controllers journal them ---------------------------------------------
    def submit(self, lid: str) -> None:
        urgent = is_urgent(self.store, [lid])
        self.courier.submit([lid], urgent, BUDGET, roomy(self.limiter, urgent))

    def incoming(self, lid: str, submit: bool = True) -> None:
        register = {"USER_PHONE_INNER": "101", "PHONE_NUMBER": "+7916" + lid[-7:].replace(".", "0"),
                    "TYPE": 2, "CALL_START_DATE": "2026-11-21T10:00:00+03:00", "CRM_CREATE": 0,
                    "EXTERNAL_CALL_ID": lid, "SHOW": 1}
        # A step that hands its call over holds it meanwhile; one long gone (submit=False: the
        # backlog of an outage) holds nothing any more.
        self.store.start_call(lid, "incoming", register["PHONE_NUMBER"], "", "101", register,
                              self.courier.owner, BUDGET + 5 if submit else 0)
        self.arrived[lid] = self.clock()
        if submit:
            self.submit(lid)

    def hangup(self, lid: str, record: bool = True, submit: bool = True) -> None:
        finish = {"USER_PHONE_INNER": "101", "DURATION": 30 if record else 0, "STATUS_CODE": "200" if record else "304"}
        rec = {"path": str(self.recording), "name": f"{lid}.wav"} if record else None
        self.store.queue_finish(lid, finish, rec, self.courier.owner, BUDGET + 5 if submit else 0)
        if submit:
            self.submit(lid)

    # -- time -------------------------------------------------------------------------------------------
    def run(self, events: List[Event], until_idle: bool = True, limit: float = 3600) -> None:
        """Play the calls' steps at their times while the deliverer does what is due, the clock
        jumping from one moment something happens to the next. `until_idle`: then go on until
        nothing waits. AssertionError if the deliverer has not caught up after `limit` seconds."""
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
    return sorted(values)[int(round(0.95 * (len(values) - 1)))]


def traffic(calls: int, per_minute: float, start: float = 0.0, prefix: str = "1796000000") -> List[Event]:
    """`calls` answered calls with recordings, one every 60/per_minute s, each talking 20-80 s."""
    events = []
    for n in range(calls):
        at = start + n * 60.0 / per_minute
        lid = f"{prefix}.{n}"
        events += [(at, "incoming", lid), (at + 20 + (n * 37) % 60, "hangup", lid)]
    return events


def past_calls(path: Path, calls: int, days: float, now: float) -> None:
    """`calls` past calls spread over the last `days`, as the journal leaves them once delivered:
    the call row, its register, finish and recording entries done (one transaction: a history,
    not the steps that made it)."""
    rows, entries = [], []
    for n in range(calls):
        at = now - days * DAY * (n + 0.5) / calls
        lid = f"1790000000.{n}"
        rows.append((lid, f"externalCall.{n:032x}.{int(at)}", at + 5, at, at + 60, at + 61))
        for kind, payload in (("register", dict(REGISTER_PARAMS, EXTERNAL_CALL_ID=lid)), ("finish", FINISH),
                              ("record", {"path": f"/var/spool/asterisk/monitor/{lid}.wav", "name": f"{lid}.wav"})):
            entries.append((lid, kind, json.dumps(payload), at, at, at + 61))
    db = sqlite3.connect(str(path))
    with db:
        db.executemany("INSERT INTO calls (linkedid, direction, phone, line, user_inner, call_id, shown,"
                       " answered_inner, answered_at, started_at, finish_claimed, finished_at, status_code, duration)"
                       " VALUES (?, 'incoming', '+79161234567', '74951234567', '101', ?, '[]', '101', ?, ?, ?, ?,"
                       " '200', 42)", rows)
        db.executemany("INSERT INTO outbox (linkedid, kind, payload, state, attempts, next_try, created_at, done_at)"
                       " VALUES (?, ?, ?, 'done', 1, ?, ?, ?)", entries)
    db.close()
