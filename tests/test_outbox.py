"""The outbox: nothing is lost when Bitrix24 is down or slow, everything arrives exactly once, in order."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ENTRY, HELD, SHORT_BUDGET, STEP_BUDGET, only_call, served


def wait_for(done, limit: float = 60.0) -> None:
    """Synchronisation only: wait until something that must happen has happened."""
    end = time.monotonic() + limit
    while not done():
        assert time.monotonic() < end, "it never happened"
        time.sleep(0.05)


def queue_call(pbx, lid, number="89161234567", talk=0.0, **kw):
    """A whole incoming call answered by 102, as the dialplan runs it."""
    runs = [pbx.run(["incoming", number], linkedid=lid, **kw)]
    runs.append(pbx.run(["answer"], linkedid=lid, channel="PJSIP/102-00000002"))
    pbx.advance(talk + 0.5)  # the talk, on a clock the test moves
    runs.append(pbx.run(["hangup", "ANSWER", str(int(talk))], linkedid=lid, dead=True))
    return runs


def test_portal_down_during_the_whole_call_then_flush(pbx, emulator):
    emulator.stop()
    runs = queue_call(pbx, "1795400000.1", talk=2)
    assert [r.set_variables["BITRIX_STATUS"] for r in runs] == ["QUEUED"] * 3
    assert all(r.returncode == 0 for r in runs)
    status = pbx.admin("outbox", "status")
    assert status.returncode == 0 and "waiting: 3" in status.stdout

    emulator.start()
    res = pbx.cli("outbox", "flush")
    assert res.returncode == 0 and "delivered 3" in res.stdout, res.stdout + res.stderr
    call = only_call(emulator)
    assert call["finished"] and call["status_code"] == "200"
    assert call["duration"] == 2  # talk time measured during the outage, not at replay
    assert call["finish_user_id"] == emulator.people["102"]
    assert call["register"]["EXTERNAL_CALL_ID"] == "1795400000.1"
    # The card move was skipped: the call was over by the time it could be shown. The register and
    # the finish went in one request, the finish using the register's CALL_ID inside it.
    assert emulator.requests_for("telephony.externalcall.show") == []
    assert emulator.requests_for("telephony.externalcall.hide") == []
    (batch,) = [r for r in emulator.requests if not r["batch"]]
    assert batch["method"] == "batch" and list(batch["params"]["cmd"]) == ["r1", "f3"]
    assert "CALL_ID=$result[r1][CALL_ID]" in batch["params"]["cmd"]["f3"]

    before = len(emulator.requests)
    res = pbx.cli("outbox", "flush")
    assert "delivered 0" in res.stdout and len(emulator.requests) == before
    assert "waiting: 0" in pbx.admin("outbox", "status").stdout


def test_slow_portal_releases_the_caller_and_replay_makes_exactly_one_call(pbx, emulator):
    pbx.set("bitrix24", "timeout", SHORT_BUDGET)
    stuck = emulator.hold("telephony.externalcall.register", count=1)  # the first one only
    run = pbx.run(["incoming", "89161234567"], linkedid="1795400100.1")
    assert run.duration < HELD, f"caller held {run.duration:.2f} s"
    assert run.set_variables["BITRIX_STATUS"] == "QUEUED"
    # The next call step (with the usual budget) replays the register while the portal still
    # chews on the first one.
    pbx.set("bitrix24", "timeout", STEP_BUDGET)
    run = pbx.run(["hangup", "NOANSWER", ""], linkedid="1795400100.1", dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    stuck.set()  # the portal finally answers the first register
    wait_for(lambda: emulator.requests_for("telephony.externalcall.register")[0]["status"] is not None)
    assert "delivered 0" in pbx.cli("outbox", "flush").stdout
    call = only_call(emulator)  # the register dedup (EXTERNAL_CALL_ID) merged the two attempts
    assert call["finished"] and call["status_code"] == "304"
    assert call["register_count"] >= 2


def test_500_and_503_keep_the_event_and_flush_delivers(pbx, emulator):
    emulator.fail_next(500, "INTERNAL_SERVER_ERROR", "boom", method="telephony.externalcall.register", count=50)
    run = pbx.run(["incoming", "89161234567"], linkedid="1795400200.1")
    assert run.set_variables["BITRIX_STATUS"] == "QUEUED"
    emulator.clear_faults()
    emulator.fail_next(503, "QUERY_LIMIT_EXCEEDED", "Too many requests", method="telephony.externalcall.finish",
                       count=50)
    pbx.set("bitrix24", "timeout", SHORT_BUDGET)  # 503s are retried with backoff until the budget ends
    run = pbx.run(["hangup", "BUSY", ""], linkedid="1795400200.1", dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "QUEUED" and run.set_variables["BITRIX_CALL_ID"]
    emulator.clear_faults()
    _expire_backoff(pbx)
    assert "delivered 1" in pbx.cli("outbox", "flush").stdout
    call = only_call(emulator)
    assert call["finished"] and call["status_code"] == "486"
    assert len(emulator.requests_for("telephony.externalcall.finish")) >= 2  # refused in the call step, then delivered


def _expire_backoff(pbx):
    """Make every waiting entry due now (as time passing would)."""
    import sqlite3

    db = sqlite3.connect(str(pbx.state_dir / "agi-bitrix.sqlite3"))
    db.execute("UPDATE outbox SET next_try = 0")
    db.commit()
    db.close()


def _queue_many(pbx, emulator, n):
    """n answered calls journaled while the portal is down (their steps served in this process)."""
    with served(pbx) as service:
        emulator.stop()
        for i in range(n):
            lid = f"1795400300.{i}"
            assert service.run(["incoming", f"8916123450{i}"], linkedid=lid).set_variables["BITRIX_STATUS"] == "QUEUED"
            service.run(["hangup", "ANSWER", str(10 + i)], linkedid=lid, dead=True)
    emulator.start()


def _flusher(pbx):
    env = dict(os.environ, AGI_BITRIX_SETTINGS=str(pbx.settings_file))
    env.pop("AST_AGI_DIR", None)
    return subprocess.Popen([str(ENTRY), "outbox", "flush"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _assert_each_call_once(pbx, emulator, n):
    calls = list(emulator.calls.values())
    assert len(calls) == n
    assert all(c["finished"] and c["register_count"] == 1 for c in calls)
    assert sorted(c["duration"] for c in calls) == [10 + i for i in range(n)]
    assert len(emulator.requests_for("telephony.externalcall.finish")) == n
    assert "waiting: 0" in pbx.admin("outbox", "status").stdout and "dead letters: 0" in pbx.admin("outbox", "status").stdout


def test_two_flushers_at_once(pbx, emulator):
    _queue_many(pbx, emulator, 10)
    emulator.set_delay(0.05)
    a, b = _flusher(pbx), _flusher(pbx)
    assert a.wait(60) == 0 and b.wait(60) == 0
    _assert_each_call_once(pbx, emulator, 10)


@pytest.fixture
def quick_state(pbx, fast_dir):
    """The PBX with its database on tmpfs where there is one: thousands of calls journaled in a
    second."""
    pbx.state_dir = Path(fast_dir)
    pbx.set("storage", "state_dir", fast_dir)
    return pbx


def _hms(ts):
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _journal(pbx, n, prefix, record=None):
    """`n` missed calls journaled as the call steps journal them while the portal is down."""
    from agi_bitrix.store import Store

    store = Store(str(pbx.state_dir))
    try:
        for i in range(n):
            lid = f"{prefix}.{i}"
            register = {"USER_PHONE_INNER": "101", "PHONE_NUMBER": f"+7916{i:07d}", "TYPE": 2,
                        "CALL_START_DATE": "2026-11-21T10:00:00+03:00", "EXTERNAL_CALL_ID": lid, "SHOW": 1}
            store.start_call(lid, "incoming", register["PHONE_NUMBER"], "", "101", register, "step", 0)
            rec = {"path": str(record), "name": record.name} if record else None
            store.queue_finish(lid, {"USER_PHONE_INNER": "101", "DURATION": 0, "STATUS_CODE": "304"}, rec, "step", 0)
    finally:
        store.close()


def test_flush_delivers_more_than_a_thousand_calls_in_batches(quick_state, emulator):
    _journal(quick_state, 1001, "1795401000")
    res = quick_state.cli("outbox", "flush")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == \
        "delivered 2002, still waiting 0, dead-lettered 0 (1001 call(s), 41 request(s))"
    assert len(emulator.calls) == 1001 and all(c["finished"] for c in emulator.calls.values())
    assert "waiting: 0   delivered: 2002   dead letters: 0" in quick_state.admin("outbox", "status").stdout


def test_flush_says_what_still_waits_and_why(quick_state, emulator, tmp_path):
    from urllib.parse import urlsplit

    from agi_bitrix.bitrix.ratelimit import RateLimiter
    from agi_bitrix.outbox import new_owner
    from agi_bitrix.store import Store

    _journal(quick_state, 3, "1795401100")
    rec = tmp_path / "fresh.wav"
    rec.write_bytes(b"RIFF" + bytes(100))
    os.utime(rec, (time.time() + 600, time.time() + 600))  # MixMonitor still writing it
    _journal(quick_state, 2, "1795401101", record=rec)
    _journal(quick_state, 1, "1795401102")
    store = Store(str(quick_state.state_dir))
    busy = new_owner()  # a deliverer of this PBX that is alive (this process) holds one call
    store.lease_calls(busy, 600, keys=["1795401102.0"], fill=False)
    held_until = store.db.execute("SELECT MAX(lease_until) FROM outbox").fetchone()[0]
    store.close()
    emulator.set_operating_limit("telephony.externalcall.finish", time.time() + 300)  # a 429 for finish
    res = quick_state.cli("outbox", "flush")
    # One request for the five calls nobody holds: their registers went through, their finishes
    # got a 429, two recordings are still being written; a live deliverer holds the sixth call.
    assert res.stdout.splitlines() == [
        "delivered 5, still waiting 9, dead-lettered 0 (5 call(s), 1 request(s))",
        "  5 waiting (finish 5): telephony.externalcall.finish: HTTP 400 OPERATION_TIME_LIMIT "
        "(Method is blocked due to operation time limit.)",
        "  2 waiting (record 2): recording fresh.wav is still being written",
        "  2 waiting (finish 1, register 1): being delivered by another deliverer "
        f"(process {os.getpid()} on {socket.gethostname()}) until {_hms(held_until)}",
        "what waits goes out with the worker (or the service) or the next flush"]
    # The next flush does not knock on the blocked method: it says until when it is held back
    # (the portal named no time: a minute, as the PBX-wide budget file remembers).
    blocked = RateLimiter(str(quick_state.state_dir), urlsplit(emulator.webhook_url).netloc).blocked_methods()
    blocked = blocked["telephony.externalcall.finish"]
    res = quick_state.cli("outbox", "flush")
    assert res.stdout.splitlines()[:2] == [
        "delivered 0, still waiting 9, dead-lettered 0 (5 call(s), 0 request(s))",
        "  5 waiting (finish 5): telephony.externalcall.finish: held back until "
        f"{_hms(blocked)} (the portal's execution-time limit for it)"]


def test_status_gives_the_backlog_its_age_and_how_long_it_takes_to_deliver(quick_state, emulator, tmp_path):
    emulator.stop()
    rec = tmp_path / "r.wav"
    rec.write_bytes(b"RIFF" + bytes(100))
    _journal(quick_state, 2500, "1795401300")
    _journal(quick_state, 10, "1795401301", record=rec)
    res = quick_state.admin("outbox", "status")
    lines = res.stdout.splitlines()
    assert lines[0] == "waiting: 5030   delivered: 0   dead letters: 0"
    assert re.fullmatch(r"oldest waiting: \d+ s old", lines[1])
    assert lines[2] == "waiting by kind: finish 2510, record 10, register 2510"
    # 5,020 entries in batches of 50 (101 requests), ten recordings sent inline one by one: 111
    # requests, 40 at once, the other 71 at 2 per second.
    assert lines[3] == ("delivering them takes about 35 s once the portal answers (111 request(s) at 2 per "
                        "second after a burst of 40)")
    res = quick_state.admin("outbox", "status", env={"LANG": "ru_RU.UTF-8"})
    assert "их отправка займёт около 35 с, когда портал отвечает (111 запрос(ов), 2 в секунду после первых 40)" \
        in res.stdout


def test_kill_9_of_a_deliverer_mid_batch_then_another_carries_on(quick_state, emulator, tmp_path):
    rec = tmp_path / "r.wav"
    rec.write_bytes(b"RIFF" + bytes(100))
    os.utime(rec, (time.time() - 60, time.time() - 60))
    _journal(quick_state, 12, "1795401200", record=rec)
    gate = emulator.hold("batch", count=1)  # the first batch reaches the portal and waits there
    victim = _flusher(quick_state)
    wait_for(lambda: emulator.requests_for("batch"))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    gate.set()  # the portal carries out the batch of the deliverer that is gone
    wait_for(lambda: emulator.requests_for("batch")[0]["status"] is not None)
    assert sum(c["finished"] for c in emulator.calls.values()) == 12
    # No waiting for its leases to run out: its process is gone, another deliverer takes over at once.
    res = quick_state.cli("outbox", "flush")
    assert res.returncode == 0, res.stderr
    # One batch for the registers and finishes, one request for each recording sent inline.
    assert res.stdout.startswith("delivered 36, still waiting 0, dead-lettered 0 (12 call(s), 13 request(s))"), \
        res.stdout
    calls = list(emulator.calls.values())
    assert len(calls) == 12  # the repeated registers found their calls (EXTERNAL_CALL_ID)
    assert all(c["finished"] and c["record"] is not None and c["register_count"] == 2 for c in calls)
    finishes = emulator.requests_for("telephony.externalcall.finish")
    assert [r["error"] for r in finishes].count(None) == 12  # finished once each; repeats answered "not found"
    assert "waiting: 0   delivered: 36   dead letters: 0" in quick_state.admin("outbox", "status").stdout


def test_recording_attached_after_finish_and_upload_retried(pbx, emulator, tmp_path):
    rec = tmp_path / "call.mp3"
    rec.write_bytes(b"ID3" + bytes(500))
    now = time.time()
    os.utime(rec, (now + 600, now + 600))  # still being written (however slow this machine is)
    pbx.run(["incoming", "89161234567"], linkedid="1795400400.1")
    run = pbx.run(["hangup", "ANSWER", "5", str(rec)], linkedid="1795400400.1", dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "QUEUED"  # finish delivered, recording waits to settle
    assert only_call(emulator)["finished"] and only_call(emulator)["record"] is None
    os.utime(rec, (now - 30, now - 30))  # MixMonitor closed it a while ago
    _expire_backoff(pbx)
    emulator.fail_next(500, "INTERNAL_SERVER_ERROR", "disk hiccup", method="telephony.externalcall.attachrecord")
    assert "still waiting 1" in pbx.cli("outbox", "flush").stdout
    assert "disk hiccup" in pbx.admin("outbox", "status").stdout
    _expire_backoff(pbx)
    assert "delivered 1" in pbx.cli("outbox", "flush").stdout
    assert only_call(emulator)["record"]["content"] == rec.read_bytes()


def test_large_recording_goes_through_upload_url(pbx, emulator, tmp_path):
    rec = tmp_path / "big.wav"
    rec.write_bytes(b"RIFF" + os.urandom(6 * 1024 * 1024))
    os.utime(rec, (time.time() - 60, time.time() - 60))
    pbx.set("bitrix24", "timeout", "10")
    pbx.run(["incoming", "89161234567"], linkedid="1795400500.1")
    pbx.run(["hangup", "ANSWER", "5", str(rec)], linkedid="1795400500.1", dead=True)
    pbx.cli("outbox", "flush")
    record = only_call(emulator)["record"]
    assert record["via"] == "upload" and record["content"] == rec.read_bytes()


def test_recording_url_template(pbx, emulator, tmp_path):
    import http.server
    import threading

    rec = tmp_path / "r1.wav"
    rec.write_bytes(b"RIFF" + bytes(100))
    os.utime(rec, (time.time() - 60, time.time() - 60))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pbx.set("calls", "recording_url", f"http://127.0.0.1:{server.server_address[1]}/{{name}}")
        pbx.run(["incoming", "89161234567"], linkedid="1795400600.1")
        pbx.run(["hangup", "ANSWER", "5", str(rec)], linkedid="1795400600.1", dead=True)
        record = only_call(emulator)["record"]
        assert record["via"] == "url" and record["content"] == rec.read_bytes()
    finally:
        server.shutdown()


def test_poison_event_is_dead_lettered_while_the_calls_behind_it_go_through(pbx, emulator):
    with served(pbx) as steps:  # the calls' steps need no process of their own here
        emulator.stop()
        steps.run(["outgoing", "555", "89161234567"], linkedid="1795400700.1")  # 555: nobody's inner number
        steps.run(["hangup", "ANSWER", "4"], linkedid="1795400700.1", dead=True)
        steps.run(["outgoing", "101", "89161234568"], linkedid="1795400700.2")
        steps.run(["hangup", "ANSWER", "6"], linkedid="1795400700.2", dead=True)
    emulator.start()
    res = pbx.cli("outbox", "flush")
    assert "delivered 2" in res.stdout and "dead-lettered 2" in res.stdout, res.stdout  # the register and its finish
    assert [c["register"]["USER_PHONE_INNER"] for c in emulator.calls.values()] == ["101"]
    status = pbx.admin("outbox", "status").stdout
    assert "dead letters: 2" in status and "User is not found" in status
    # The administrator fixes the cause and puts the dead letters back in line.
    emulator.add_user("Gleb", "Test", inner="555")
    assert "2 dead letter(s)" in pbx.cli("outbox", "retry").stdout
    res = pbx.cli("outbox", "flush")
    assert "delivered 2" in res.stdout
    assert sorted(c["register"]["USER_PHONE_INNER"] for c in emulator.calls.values()) == ["101", "555"]
    assert all(c["finished"] for c in emulator.calls.values())


def test_worker_delivers_continuously_and_stops_on_sigterm(pbx, emulator):
    with served(pbx) as steps:  # the call's steps need no process of their own here
        emulator.stop()
        queue_call(steps, "1795400800.1")
    emulator.start()
    _expire_backoff(pbx)  # the worker respects the retry backoff; pretend it has passed
    env = dict(os.environ, AGI_BITRIX_SETTINGS=str(pbx.settings_file))
    env.pop("AST_AGI_DIR", None)
    worker = subprocess.Popen([str(ENTRY), "worker", "--interval", "0.2"], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: emulator.calls and all(c["finished"] for c in emulator.calls.values()))
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    assert only_call(emulator)["finished"]
    assert any(e["event"] == "worker_stopped" for e in pbx.log())


def test_unwritable_state_is_reported_by_check(pbx, emulator, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    pbx.set("storage", "state_dir", str(blocker / "state"))
    res = pbx.admin("check")
    assert res.returncode == 1 and "state" in res.stdout and "not writable" in res.stdout


def test_check_reports_what_waits_and_the_dead_letters(pbx, emulator):
    emulator.stop()
    pbx.run(["outgoing", "555", "89161234567"], linkedid="1795400900.1")
    res = pbx.admin("check")
    assert "outbox" in res.stdout and "1 waiting for delivery" in res.stdout
    emulator.start()
    pbx.cli("outbox", "flush")
    res = pbx.admin("check")
    assert res.returncode == 1 and "1 dead letter(s)" in res.stdout
