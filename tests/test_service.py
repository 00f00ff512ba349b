"""`agi-bitrix service`: FastAGI call steps, bad peers, the connection cap, health and metrics, reload,
SIGTERM in the middle of a step, and the dialplan's fallback to process mode when the service is down."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional

import pytest
from conftest import ENTRY, PBX, ServicePBX, free_port, only_call

from agi_bitrix.testing.fake_fastagi import FakeFastAGI

WAIT = 60.0  # how long a test waits for something that must happen (a loaded CI box is slow)


def until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll until `condition()` is true; fail with `what` after a generous timeout."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def service(tmp_path, emulator):
    # Long enough that a loaded machine never stalls a well-behaved peer (the 1 MB block goes out in
    # pieces), short enough for the tests of peers that do stall.
    pbx = ServicePBX(tmp_path, emulator.webhook_url, env_timeout=2.0).start()
    try:
        yield pbx
    finally:
        pbx.stop()


def step_with_fallback(fastagi: Callable[[], Any], process: Callable[[], Any]) -> List[Any]:
    """The sample dialplan's [bitrix-step]: FastAGI first; on AGISTATUS=FAILURE, or when
    BITRIX_STATUS was never set, the same step in process mode."""
    first = fastagi()
    if first.agistatus == "FAILURE" or not first.set_variables.get("BITRIX_STATUS"):
        return [first, process()]
    return [first]


def refused_lines(pbx: PBX) -> List[dict]:
    return [e for e in pbx.log() if e["event"] == "fastagi_refused"]


# ----------------------------------------------------------------------------------- the protocol

def test_a_step_over_fastagi_is_plain_agi_after_the_block(service, emulator):
    run = service.run(["incoming", "89161234567", "74951234567"], linkedid="1795600000.1")
    assert run.agistatus == "SUCCESS" and not run.violations
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert run.set_variables["BITRIX_CALL_ID"] == only_call(emulator)["CALL_ID"]
    line = service.log()[-1]
    assert line["event"] == "incoming" and line["transport"] == "fastagi" and line["linkedid"] == "1795600000.1"


def test_the_query_string_of_the_script_is_not_part_of_the_event(service, emulator):
    host, port = service.address
    run = FakeFastAGI(host, port, "incoming?from=trunk1", ["89161234567"], linkedid="1795600001.1").run()
    assert run.set_variables["BITRIX_STATUS"] == "OK" and len(emulator.calls) == 1


def test_caller_closing_the_connection_is_a_hangup_and_frees_the_thread(service, emulator):
    host, port = service.address
    peer = FakeFastAGI(host, port, "incoming", ["89161234567"], linkedid="1795600002.1")
    with socket.create_connection((host, port)) as sock:
        sock.sendall(peer.env_block())
        assert sock.makefile("rb").readline().startswith(b"GET VARIABLE")
    line = until(lambda: [e for e in service.log() if e["event"] == "incoming"], "the step's log line")[0]
    assert line["hung_up"] is True
    until(lambda: service.service.fastagi.threads() == 0, "the connection's thread to end")


def test_unknown_script_is_answered_and_logged(service, emulator):
    run = service.run(["conference", "1"], linkedid="1795600003.1")
    assert run.set_variables["BITRIX_STATUS"] == "ERROR" and not emulator.calls
    assert "unknown event 'conference'" in service.log()[-1]["reason"]
    host, port = service.address
    run = FakeFastAGI(host, port, "", [], linkedid="1795600003.2").run()  # agi://host:port, no script
    assert run.set_variables["BITRIX_STATUS"] == "ERROR" and "unknown event ''" in service.log()[-1]["reason"]


# ----------------------------------------------------------------------------------- bad peers

def _bad_peer(service: ServicePBX, payload: bytes, close_write: bool = False) -> bytes:
    """Send `payload`, then read until the server closes; returns what the server sent."""
    with socket.create_connection(service.address) as sock:
        sock.settimeout(WAIT)
        try:
            sock.sendall(payload)
            if close_write:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close while we still write (the 1 MB block)
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return received
                received += chunk
        except ConnectionResetError:
            return received


@pytest.mark.parametrize("payload, close_write, reason", [
    (b"GET / HTTP/1.1\r\nHost: pbx\r\n\r\n", False, "not a FastAGI environment block"),
    (b"", True, "closed the connection before the end of the environment block"),
    (b"agi_network: yes\nagi_network_script: incoming\n" + b"agi_x: " + b"x" * (1 << 20) + b"\n\n", False,
     "larger than"),
    (b"agi_network: yes\nagi_network_script: incoming\nagi_channel: PJSIP/1", False, "stalled"),
    (b"\x00\xff\xfe garbage \x01" * 50, False, "stalled"),
], ids=["http", "no-block", "1MB-block", "stall-half-way", "garbage"])
def test_bad_peers_get_a_log_line_and_a_closed_connection(service, emulator, payload, close_write, reason):
    received = _bad_peer(service, payload, close_write)
    assert received == b""  # not one AGI command went to something that is not Asterisk
    until(lambda: service.service.fastagi.threads() == 0, "the connection's thread to end")
    lines = refused_lines(service)
    assert len(lines) == 1 and reason in lines[0]["reason"] and lines[0]["peer"] == "127.0.0.1"
    # Other calls are untouched.
    run = service.run(["incoming", "89161234567"], linkedid="1795600010.1")
    assert run.set_variables["BITRIX_STATUS"] == "OK" and len(emulator.calls) == 1


def test_an_address_not_allowed_is_closed_without_a_word(service, emulator):
    service.set("service", "allow", "10.0.0.0/8")
    host, port = service.address
    run = FakeFastAGI(host, port, "incoming", ["89161234567"], linkedid="1795600020.1").run()
    assert run.commands == [] and not emulator.calls
    line = refused_lines(service)[-1]
    assert line["peer"] == "127.0.0.1" and "not allowed" in line["reason"]
    until(lambda: service.service.fastagi.threads() == 0, "no thread for a refused peer")
    service.set("service", "allow", "127.0.0.1")
    assert service.run(["incoming", "89161234567"], linkedid="1795600020.2").set_variables["BITRIX_STATUS"] == "OK"


def test_over_the_cap_a_step_is_answered_failure_and_runs_in_process_mode(service, emulator):
    service.set("service", "max_connections", "1")
    host, port = service.address
    in_dial = threading.Event()
    release = threading.Event()

    def dial(fake: Any, options: str) -> int:  # an employee's call in progress holds its connection
        in_dial.set()
        release.wait(WAIT)
        fake.variables.update(DIALSTATUS="ANSWER", ANSWEREDTIME="3")
        return 0

    holder: List[Any] = []
    thread = threading.Thread(target=lambda: holder.append(
        FakeFastAGI(host, port, "dial", ["89167654321", "101"], linkedid="1795600030.1", apps={"Dial": dial},
                    timeout=WAIT).run()))
    thread.start()
    try:
        assert in_dial.wait(WAIT)
        runs = step_with_fallback(
            lambda: FakeFastAGI(host, port, "incoming", ["89161234567"], linkedid="1795600030.2").run(),
            lambda: service.run_process(["incoming", "89161234567"], linkedid="1795600030.2"))
    finally:
        release.set()
        thread.join(WAIT)
    assert runs[0].agistatus == "FAILURE" and runs[0].commands == ["failure"]
    assert runs[1].set_variables["BITRIX_STATUS"] == "OK"  # the same step, in process mode
    assert "more than 1 call steps at once" in refused_lines(service)[-1]["reason"]
    assert holder[0].set_variables["BITRIX_STATUS"] == "OK" and len(emulator.calls) == 2


# ----------------------------------------------------------------------------------- load

def test_100_steps_at_once_against_a_healthy_portal(service, emulator):
    # What is shown is correctness at 100 at once; the speed is in bench/fastagi.py.
    service.set("bitrix24", "timeout", "30")
    service.set("bitrix24", "rate_burst", "500")
    lids = [f"1795600100.{i}" for i in range(100)]
    with ThreadPoolExecutor(100) as pool:
        runs = list(pool.map(lambda lid: service.run(["incoming", "89161234567", "74951234567"], linkedid=lid,
                                                     timeout=WAIT * 2), lids))
    assert [r.set_variables.get("BITRIX_STATUS") for r in runs] == ["OK"] * 100
    assert len(emulator.calls) == 100
    assert sorted(c["register"]["EXTERNAL_CALL_ID"] for c in emulator.calls.values()) == sorted(lids)
    until(lambda: service.service.fastagi.threads() == 0, "every connection's thread to end")


# ----------------------------------------------------------------------------------- health, metrics

def _get(service: ServicePBX, path: str) -> Any:
    host, port = service.service.web.server_address[:2]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=WAIT) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read().decode()


def test_healthz_says_ready_and_why_not(service, emulator, tmp_path):
    until(lambda: service.service.portal["ok"], "the first contact with the portal")
    status, ctype, body = _get(service, "/healthz")
    assert status == 200 and ctype == "application/json"
    assert json.loads(body) == {"ready": True, "reasons": {"portal": "", "store": "", "deliverer": ""}}
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    service.set("storage", "state_dir", str(blocker))
    status, _, body = _get(service, "/healthz")
    answer = json.loads(body)
    assert status == 503 and answer["ready"] is False and str(blocker) in answer["reasons"]["store"]


def test_metrics_in_the_prometheus_text_format(service, emulator):
    emulator.fail_next(503, "QUERY_LIMIT_EXCEEDED", "Too many requests", method="telephony.externalcall.register")
    service.run(["incoming", "89161234567"], linkedid="1795600200.1")  # retried after the 503: OK
    emulator.fail_next(500, "INTERNAL_SERVER_ERROR", "try later", method="telephony.externalcall.register")
    service.run(["incoming", "89161234568"], linkedid="1795600200.2")  # QUEUED: the outbox holds it
    status, ctype, body = _get(service, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in body.splitlines() if line and not line.startswith("#")}
    assert samples['agi_bitrix_steps_total{event="incoming",status="OK",transport="fastagi"}'] == 1
    assert samples['agi_bitrix_steps_total{event="incoming",status="QUEUED",transport="fastagi"}'] == 1
    assert samples['agi_bitrix_step_seconds_count{event="incoming"}'] == 2
    assert samples['agi_bitrix_rest_requests_total{method="telephony.externalcall.register"}'] == 3
    assert samples['agi_bitrix_rest_limited_total{method="telephony.externalcall.register",status="503"}'] == 1
    assert samples["agi_bitrix_outbox_waiting"] == 1 and samples["agi_bitrix_outbox_dead_letters"] == 0
    assert samples["agi_bitrix_outbox_oldest_age_seconds"] >= 0
    assert samples["agi_bitrix_fastagi_connections"] == 0


# ----------------------------------------------------------------------------------- reload

def test_reload_takes_new_settings_for_the_next_step(service, emulator):
    service.set("calls", "default_user", "103")
    run = service.run(["incoming", "89031112233"], linkedid="1795600300.1")
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert only_call(emulator)["register"]["USER_PHONE_INNER"] == "103"
    assert any(e["event"] == "service_reloaded" for e in service.log())


def test_bad_settings_on_reload_keep_the_ones_in_force(service, emulator):
    service.settings_file.write_text(service.settings_file.read_text() + "[calls]\nregion = Russia\n")
    assert service.service.reload() is False
    assert "the settings in force stay" in service.log()[-1]["reason"]
    assert service.run(["incoming", "89161234567"], linkedid="1795600301.1").set_variables["BITRIX_STATUS"] == "OK"


# ----------------------------------------------------------------------------------- the installed service

class ServiceProcess:
    """`agi-bitrix service` started through the installed entry point, as systemd would."""

    def __init__(self, pbx: PBX) -> None:
        self.pbx = pbx
        self.port = free_port()
        pbx.set("service", "fastagi", f"127.0.0.1:{self.port}")
        pbx.set("events", "listen", f"127.0.0.1:{free_port()}")
        pbx.set("service", "flush_interval", "3600")  # the log holds only what the steps wrote
        env = dict(os.environ, AGI_BITRIX_SETTINGS=str(pbx.settings_file))
        env.pop("AST_AGI_DIR", None)
        self.proc = subprocess.Popen([str(ENTRY), "service"], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        until(lambda: self.proc.poll() is not None or self.logged("service_started"), "the service to start")
        assert self.proc.poll() is None, self.proc.communicate()

    def logged(self, event: str) -> List[dict]:
        return [e for e in self.pbx.log() if e["event"] == event]

    def peer(self, event: str, args: List[str], **kw: Any) -> FakeFastAGI:
        return FakeFastAGI("127.0.0.1", self.port, event, args, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


class _OnFirstCommand(FakeFastAGI):
    """A peer that does something (kill or stop the service) when the first command arrives."""

    def __init__(self, *a: Any, action: Callable[[], None], **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.action: Optional[Callable[[], None]] = action

    def _serve_line(self, raw: bytes, split_head: bool) -> Optional[str]:
        if self.action is not None:
            action, self.action = self.action, None
            action()
        return super()._serve_line(raw, split_head)


def test_service_stopped_the_dialplan_falls_back_to_process_mode(pbx, emulator):
    port = free_port()  # nothing listens there: Asterisk gets "connection refused"
    runs = step_with_fallback(
        lambda: FakeFastAGI("127.0.0.1", port, "incoming", ["89161234567"], linkedid="1795600400.1").run(),
        lambda: pbx.run(["incoming", "89161234567"], linkedid="1795600400.1"))
    assert runs[0].agistatus == "FAILURE" and runs[0].commands == []
    assert runs[1].set_variables["BITRIX_STATUS"] == "OK" and len(emulator.calls) == 1


def test_service_dying_mid_step_the_dialplan_runs_the_step_again(pbx, emulator):
    svc = ServiceProcess(pbx)
    try:
        peer = _OnFirstCommand("127.0.0.1", svc.port, "incoming", ["89161234567"], linkedid="1795600401.1",
                               action=svc.proc.kill)
        runs = step_with_fallback(peer.run, lambda: pbx.run(["incoming", "89161234567"], linkedid="1795600401.1"))
    finally:
        svc.stop()
    # A dropped server looks like a normal end to Asterisk: SUCCESS, but BITRIX_STATUS never set.
    assert runs[0].agistatus == "SUCCESS" and "BITRIX_STATUS" not in runs[0].set_variables
    assert runs[1].set_variables["BITRIX_STATUS"] == "OK" and len(emulator.calls) == 1


def test_sigterm_mid_step_lets_it_finish_and_stops(pbx, emulator):
    pbx.set("bitrix24", "timeout", "30")
    emulator.set_delay(1.0, method="telephony.externalcall.register")
    svc = ServiceProcess(pbx)
    try:
        peer = _OnFirstCommand("127.0.0.1", svc.port, "incoming", ["89161234567"], linkedid="1795600402.1",
                               action=lambda: svc.proc.send_signal(signal.SIGTERM), timeout=WAIT)
        run = peer.run()
        code = svc.proc.wait(WAIT)
    finally:
        svc.stop()
    assert run.set_variables["BITRIX_STATUS"] == "OK" and only_call(emulator)["CALL_ID"]
    assert code == 0 and svc.logged("service_stopped")[-1]["steps_cut"] == 0
    # Nothing was taken after SIGTERM: a new step gets "connection refused" (the dialplan's fallback).
    assert FakeFastAGI("127.0.0.1", svc.port, "incoming", [], linkedid="1795600402.2").run().agistatus == "FAILURE"


def test_sighup_rereads_settings_and_reopens_the_log_after_logrotate(pbx, emulator):
    svc = ServiceProcess(pbx)
    try:
        rotated = pbx.log_file.with_name("agi-bitrix.log.1")
        os.rename(pbx.log_file, rotated)  # logrotate's `create` mode
        pbx.set("calls", "default_user", "102")
        svc.proc.send_signal(signal.SIGHUP)
        until(lambda: svc.logged("service_reloaded"), "the reload")
        run = svc.peer("incoming", ["89031112233"], linkedid="1795600403.1").run()
        assert run.set_variables["BITRIX_STATUS"] == "OK"
        assert only_call(emulator)["register"]["USER_PHONE_INNER"] == "102"
        assert [e["event"] for e in pbx.log()] == ["service_reloaded", "incoming"]
        assert "service_started" in rotated.read_text()
    finally:
        assert svc.stop() == 0


def test_every_step_of_the_sample_dialplan_falls_back_to_process_mode():
    """Each context of extensions.conf.sample runs its steps through [bitrix-step], whose FastAGI
    call is followed by the process-mode call on FAILURE or an unset BITRIX_STATUS."""
    from importlib import resources

    text = resources.files("agi_bitrix").joinpath("data/extensions.conf.sample").read_text(encoding="utf-8")
    context, steps, outside = "", [], []
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            context = line[1:-1]
        elif "AGI(" in line:
            (steps if context == "bitrix-step" else outside).append(line)
    assert outside == []  # no context calls AGI() directly
    assert steps == ["same => n,AGI(${BITRIX_AGI}/${ARG1},${ARG2},${ARG3},${ARG4})",
                     "same => n,AGI(agi-bitrix,${ARG1},${ARG2},${ARG3},${ARG4})"]
    assert 'GotoIf($["${AGISTATUS}" != "FAILURE" & "${BITRIX_STATUS}" != ""]?done)' in text
    assert text.count("Gosub(bitrix-step,s,1(") >= 13


def test_steps_share_one_pool_of_kept_alive_connections(service, emulator):
    until(lambda: service.service.portal["ok"], "the first contact with the portal")
    before = emulator.connections_opened
    for i in range(10):
        run = service.run(["incoming", "89161234567"], linkedid=f"1795600500.{i}")
        assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert emulator.connections_opened == before  # every request went over the connection already open
    assert len(emulator.calls) == 10


def test_the_step_budget_holds_in_a_thread_where_no_signal_reaches():
    """SIGALRM only interrupts the main thread; a service thread stops waiting at the deadline."""
    from agi_bitrix.deadline import Deadline, DeadlineExceeded

    portal = threading.Event()  # a request that would hang until the test ends
    outcome: List[str] = []

    def step() -> None:
        try:
            Deadline(0.2).call(lambda: portal.wait(WAIT))
            outcome.append("returned")
        except DeadlineExceeded:
            outcome.append("budget")

    thread = threading.Thread(target=step)
    thread.start()
    thread.join(WAIT / 2)
    portal.set()
    assert outcome == ["budget"]


def test_service_command_refuses_clearly(pbx):
    pbx.set("service", "allow", "127.0.0.1, the-asterisk-box")
    res = pbx.cli("service")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "[service] allow 'the-asterisk-box' is not an IP address or network" in res.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        pbx.set("service", "allow", "127.0.0.1")
        port = taken.getsockname()[1]
        pbx.set("service", "fastagi", "127.0.0.1:%d" % port)
        res = pbx.cli("service")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "cannot listen on 127.0.0.1:%d ([service] fastagi)" % port in res.stderr and "in use" in res.stderr


def test_the_dialer_loop_runs_inside_the_service(tmp_path, emulator):
    from test_dialer import CallCenter

    from agi_bitrix.testing.fake_ami import FakeAMI

    with FakeAMI(username="crm", secret="ami-secret-1") as ami:
        pbx = ServicePBX(tmp_path, emulator.webhook_url)
        center = CallCenter(pbx, emulator, ami)  # the dialplan's steps go over FastAGI to the same service
        pbx.set("service", "dialer", "yes")
        center.task("Позвонить: Иван Петров", ["+7 916 111-22-33"], responsible=center.boris)
        pbx.start()
        try:
            until(lambda: [c for c in emulator.calls.values() if c.get("finished")], "the dialer's call to end")
            call = next(iter(emulator.calls.values()))
            assert call["status_code"] == "200" and call["user_id"] == center.boris
            assert ami.originates[0].get("Channel") == "PJSIP/+79161112233@provider"
            status, _, body = _get(pbx, "/healthz")
            assert json.loads(body)["reasons"]["dialer"] == ""
            passes = [line for line in _get(pbx, "/metrics")[2].splitlines()
                      if line.startswith("agi_bitrix_dialer_passes_total ")]
            assert passes and float(passes[0].split()[1]) >= 1
            def steps() -> List[dict]:
                return [e for e in pbx.log() if e["event"] in ("dialer-answered", "dialer-connected", "hangup")]

            until(lambda: len(steps()) == 3, "the hangup step's log line")
            assert [e["transport"] for e in steps()] == ["fastagi"] * 3
        finally:
            pbx.stop()


def test_check_says_whether_the_service_is_up_and_ready(service, emulator, tmp_path):
    # Ready once the deliverer's first probe reached the portal (before it: "portal: no request yet").
    until(lambda: service.service.portal["ok"], "the first contact with the portal")
    res = service.admin("check")
    assert "OK       service    agi-bitrix service is ready: FastAGI on 127.0.0.1:" in res.stdout, res.stdout
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    service.service.settings = service.service.settings.model_copy(
        update={"storage": service.service.settings.storage.model_copy(update={"state_dir": str(blocker)})})
    res = service.admin("check")
    assert "PROBLEM  service    agi-bitrix service is not ready: store: " in res.stdout and res.returncode == 1
    service.stop()
    res = service.admin("check")
    assert "WARNING  service    agi-bitrix service is not running" in res.stdout


def test_the_fastagi_peer_speaks_as_asterisk_22():
    """The test peer itself: block order, query string kept, HANGUP after a command in progress,
    the last HANGUP at the end of the session, FAILURE when nothing listens."""
    seen: List[bytes] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                f = conn.makefile("rwb", buffering=0)
                while True:
                    line = f.readline()
                    seen.append(line)
                    if line == b"\n":
                        break
                f.write(b'EXEC Wait "5"\n')
                seen.append(f.readline())  # the answer of the command in progress comes first
                seen.append(f.readline())  # then the HANGUP line
                f.write(b'SET VARIABLE BITRIX_STATUS "OK"\n')  # dead-capable: still served
                seen.append(f.readline())
                conn.shutdown(socket.SHUT_WR)
                seen.append(f.readline())  # after our close, one more HANGUP

        thread = threading.Thread(target=serve)
        thread.start()
        peer = FakeFastAGI("127.0.0.1", port, "incoming?trunk=1", ["89161234567", ""], linkedid="1.2",
                           hangup_after=0.2, timeout=WAIT)
        run = peer.run()
        thread.join(WAIT)
    assert seen[0] == b"agi_network: yes\n" and seen[1] == b"agi_network_script: incoming?trunk=1\n"
    assert seen[2] == b"agi_request: agi://127.0.0.1:%d/incoming?trunk=1\n" % port
    assert b"agi_arg_1: 89161234567\n" in seen and b"agi_arg_2: \n" in seen
    assert seen[-4:] == [b"200 result=-1\n", b"HANGUP\n", b"200 result=1\n", b"HANGUP\n"]
    assert run.agistatus == "HANGUP" and run.set_variables == {"BITRIX_STATUS": "OK"}
    assert run.sighup_sent and peer.hangup_lines == 1
    assert FakeFastAGI("127.0.0.1", free_port(), "incoming", []).run().agistatus == "FAILURE"
