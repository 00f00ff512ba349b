"""Nobody but our own portal steers `agi-bitrix serve`: forged installation callbacks, bodies built
to break the parser, slow and vanishing clients, all through the real entry point on 127.0.0.1."""
from __future__ import annotations

import json
import select
import selectors
import socket
import struct
import time
import urllib.parse
from pathlib import Path

import pytest
import requests

from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from test_click2call import Desk, desk, online  # noqa: F401 (fixtures: serve with online events)

INBOUND = dict(channel="PJSIP/provider-00000001", context="bitrix-inbound", extension="74951234567",
               dnid="74951234567")


def stored(desk: Desk) -> dict:
    return json.loads((desk.pbx.state_dir / "oauth-tokens.json").read_text())


def refusals(desk: Desk) -> list:
    return [e for e in desk.pbx.log() if e["event"] == "event_refused"]


def stderr_of(desk: Desk) -> str:
    desk.stop()
    return "".join(proc.stderr.read() for proc in desk.procs)


def wait_for_log(desk: Desk, event: str, timeout: float = 60.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        found = [e for e in desk.pbx.log() if e["event"] == event]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {event} in the log: {desk.pbx.log()[-3:]}")


@pytest.fixture
def attacker():
    """The attacker's own portal and application: genuine tokens, but not of ours."""
    with Bitrix24Emulator(client_id="local.attacker.app", client_secret="attacker-secret") as evil:
        yield evil


def forge_install(emulator: Bitrix24Emulator, url: str, pair: dict, **auth) -> int:
    """An ONAPPINSTALL with our portal's domain and member_id (anybody can learn them) and `pair`."""
    extra = {"access_token": pair["access_token"], "refresh_token": pair["refresh_token"],
             "expires_in": "3600", "scope": pair["scope"], "status": "L"}
    extra.update(auth)
    return emulator.post_event(url, "ONAPPINSTALL", {"VERSION": "1", "INSTALLED": "Y"},
                               application_token=auth.pop("application_token", "attacker-app-token"),
                               auth_extra=extra)


def click(emulator: Bitrix24Emulator, url: str, application_token: str) -> int:
    data = {"CALL_ID": "externalCall.forged.9", "USER_ID": str(emulator.people["101"]), "EXTENSION": "101",
            "PHONE_NUMBER_INTERNATIONAL": "+79160000009"}
    return emulator.post_event(url, "ONEXTERNALCALLSTART", data, application_token=application_token)


# -- 1. the installation callback and the events prove they come from our portal --------------

def test_genuine_install_is_proven_then_stored_and_binds_the_events(online, emulator):
    proof = [r for r in emulator.requests if r["method"] in ("app.info", "user.admin")]
    assert [(r["method"], r["auth"], r["status"]) for r in proof] == [("app.info", "oauth", 200),
                                                                    ("user.admin", "oauth", 200)]
    assert stored(online)["application_token"] == emulator.application_token
    assert stored(online)["client_endpoint"] == emulator.client_endpoint
    assert sorted(b["event"] for b in emulator.event_bindings) == ["ONEXTERNALCALLBACKSTART", "ONEXTERNALCALLSTART"]
    data = emulator.click_to_call(emulator.people["101"], "+79167654340")
    assert online.finished(data["CALL_ID"])["status_code"] == "200"


def test_forged_install_with_foreign_tokens_and_endpoints_is_refused(online, emulator, attacker):
    url = f"http://127.0.0.1:{online.port}/"
    before = stored(online)
    evil = attacker.issue_tokens()
    # The attacker's tokens and endpoints: refused before anything is asked of anybody.
    assert forge_install(emulator, url, evil, client_endpoint=attacker.client_endpoint,
                         server_endpoint=attacker.server_endpoint) == 403
    assert forge_install(emulator, url, evil, server_endpoint=attacker.server_endpoint) == 403
    # The attacker's tokens with our portal's endpoints: our portal does not know them.
    assert forge_install(emulator, url, evil) == 403
    assert stored(online) == before
    assert attacker.requests == []  # never contacted: no token sent there, no client_secret
    reasons = [e["reason"] for e in refusals(online)]
    assert "another REST address" in reasons[0] and "OAuth server" in reasons[1]
    assert "does not work on" in reasons[2] and "invalid_token" in reasons[2]
    assert evil["access_token"] not in online.pbx.log_text()

    # Nothing dialed on the attacker's word, and the next call goes to our portal.
    assert click(emulator, url, "attacker-app-token") == 403
    run = online.pbx.run(["incoming", "89161234567", "74951234567"], linkedid="1795600001.1", **INBOUND)
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert len(emulator.requests_for("telephony.externalcall.register")) == 1 and attacker.requests == []
    time.sleep(0.3)
    assert online.ami.originates == []


def test_install_with_a_real_token_of_another_application_or_an_employee_is_refused(online, emulator):
    url = f"http://127.0.0.1:{online.port}/"
    before = stored(online)
    emulator.add_application("local.other.app", "other-secret")
    assert forge_install(emulator, url, emulator.issue_tokens(client_id="local.other.app")) == 403
    # Any employee who opens a page of our application holds a token of it; he cannot install it.
    assert forge_install(emulator, url, emulator.issue_tokens(user_id=emulator.people["102"])) == 403
    assert stored(online) == before
    reasons = [e["reason"] for e in refusals(online)]
    assert "another application" in reasons[0] and "user.admin" in reasons[1]
    assert click(emulator, url, "attacker-app-token") == 403
    time.sleep(0.3)
    assert online.ami.originates == []


def test_a_genuine_token_with_a_foreign_oauth_server_is_refused(online, emulator):
    """The OAuth server receives client_secret at every renewal: a callback cannot choose it."""
    url = f"http://127.0.0.1:{online.port}/"
    before = stored(online)
    assert forge_install(emulator, url, emulator.issue_tokens(),
                         server_endpoint="https://oauth.attacker.example/rest/") == 403
    assert stored(online) == before and "OAuth server" in refusals(online)[0]["reason"]


def test_reinstall_replaces_the_pair_after_the_same_proof(online, emulator):
    url = f"http://127.0.0.1:{online.port}/"
    first = stored(online)
    assert emulator.install_app(url) == 200
    second = stored(online)
    assert second["access_token"] != first["access_token"]
    assert [r["status"] for r in emulator.requests_for("app.info")] == [200, 200]
    data = emulator.click_to_call(emulator.people["101"], "+79167654341")
    assert online.finished(data["CALL_ID"])["status_code"] == "200"


def test_an_update_callback_without_tokens_cannot_change_the_application_token(online, emulator):
    url = f"http://127.0.0.1:{online.port}/"
    before = stored(online)
    assert emulator.post_event(url, "ONAPPUPDATE", {"VERSION": "2", "PREVIOUS_VERSION": "1"},
                               application_token="attacker-app-token") == 403
    assert stored(online) == before and "nothing proves it" in refusals(online)[0]["reason"]
    assert click(emulator, url, "attacker-app-token") == 403


def test_events_naming_another_portal_are_refused(online, emulator):
    url = f"http://127.0.0.1:{online.port}/"
    data = {"CALL_ID": "externalCall.forged.10", "USER_ID": str(emulator.people["101"]),
            "PHONE_NUMBER_INTERNATIONAL": "+79160000010"}
    assert emulator.post_event(url, "ONEXTERNALCALLSTART", data, auth_extra={"domain": "evil.bitrix24.ru"}) == 403
    assert "domain" in refusals(online)[0]["reason"]
    time.sleep(0.3)
    assert online.ami.originates == []


# -- 2. the form parser's bounds ---------------------------------------------------------------

def raw_post(port: int, body: bytes, length: int | None = None) -> bytes:
    """One POST over a plain socket; returns the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode()
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_nested_many_and_oversized_bodies_get_400_and_one_log_line(online, emulator):
    nested = b"a" + b"%5Ba%5D" * 8000 + b"=1"  # 56 KB of a[a][a]...
    assert raw_post(online.port, nested).startswith(b"HTTP/1.0 400")
    many = "&".join(f"k{i}=1" for i in range(3000)).encode()
    assert raw_post(online.port, many).startswith(b"HTTP/1.0 400")
    assert raw_post(online.port, b"", length=10_000_000).startswith(b"HTTP/1.0 400")  # no body read
    reasons = [e["reason"] for e in refusals(online)]
    assert len(reasons) == 3
    assert "nested deeper" in reasons[0] and "more than 1000 keys" in reasons[1] and "over 65536" in reasons[2]
    data = emulator.click_to_call(emulator.people["101"], "+79167654342")  # still serving
    assert online.finished(data["CALL_ID"])["status_code"] == "200"
    assert "Traceback" not in stderr_of(online)


# -- 3. request timeout and connection cap ------------------------------------------------------

def serve_threads(desk: Desk) -> int:
    status = Path(f"/proc/{desk.procs[0].pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def test_200_slow_clients_the_cap_holds_and_a_genuine_event_gets_through(desk, emulator):
    cap = 20
    desk.pbx.set("events", "max_connections", str(cap))
    desk.pbx.set("events", "request_timeout", "120")  # longer than the test: the held ones stay held
    desk.serve()
    end = time.time() + 60
    while serve_threads(desk) > 2:  # the install callback's thread has given its slot back
        assert time.time() < end, f"{serve_threads(desk)} threads in serve while idle"
        time.sleep(0.05)
    clients = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", desk.port), timeout=30)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4000\r\n")  # and then nothing
        sock.setblocking(False)
        clients.append(sock)
    answers = {sock: b"" for sock in clients}
    closed = set()
    sel = selectors.DefaultSelector()
    for sock in clients:
        sel.register(sock, selectors.EVENT_READ)
    end = time.time() + 120
    while len(closed) < 200 - cap and time.time() < end:  # bounded: a broken cap fails here
        for key, _ in sel.select(timeout=1.0):
            try:
                chunk = key.fileobj.recv(4096)
            except ConnectionResetError:
                chunk = b""
            answers[key.fileobj] += chunk
            if not chunk:
                closed.add(key.fileobj)
                sel.unregister(key.fileobj)
    assert len(closed) == 200 - cap
    assert all(answers[sock].startswith(b"HTTP/1.0 503") for sock in closed)
    held = [sock for sock in clients if sock not in closed]
    for sock in held:  # still open, waiting for the rest of their request
        with pytest.raises(BlockingIOError):
            sock.recv(1)
    assert serve_threads(desk) <= cap + 4
    busy = [e for e in desk.pbx.log() if e["event"] == "http_busy"]
    assert len(busy) == 1, busy

    for sock in clients:
        sock.close()
    over = wait_for_log(desk, "http_busy_over")
    assert over["refused"] == 200 - cap
    data = emulator.click_to_call(emulator.people["101"], "+79167654343")
    assert desk.finished(data["CALL_ID"])["status_code"] == "200"
    assert emulator.event_deliveries[-1]["status"] == 200
    assert len([e for e in desk.pbx.log() if e["event"] == "http_busy"]) == 1
    assert "Traceback" not in stderr_of(desk)


def test_a_client_trickling_its_request_is_cut_off_at_the_request_timeout(desk, emulator):
    desk.pbx.set("events", "request_timeout", "1")
    desk.serve()
    # Never complete (the body is shorter than announced): only the server can end this connection.
    request = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 900\r\n\r\n" + b"x" * 300
    answer = None
    with socket.create_connection(("127.0.0.1", desk.port), timeout=30) as sock:
        for byte in request:  # a byte every 0.1 s: each read is quick, the whole would take 35 s
            try:
                sock.sendall(bytes([byte]))
                readable, _, _ = select.select([sock], [], [], 0.1)
                if readable:
                    answer = sock.recv(4096)
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
            if answer is not None:
                break
    assert answer == b"", "the server kept a trickling client for its whole request"
    assert wait_for_log(desk, "http_timeout")["reason"] == "the request took longer than 1 s"
    assert requests.get(f"http://127.0.0.1:{desk.port}/", timeout=10).status_code == 200
    assert "Traceback" not in stderr_of(desk)


# -- 4. a client that goes away is not an error -------------------------------------------------

def test_clients_that_vanish_mid_answer_leave_no_traceback(online, emulator):
    form = urllib.parse.urlencode({"event": "ONEXTERNALCALLSTART", "data[CALL_ID]": "externalCall.x.1",
                                   "auth[application_token]": "wrong"}).encode()
    request = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
               b"Content-Length: " + str(len(form)).encode() + b"\r\n\r\n" + form)
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", online.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        sock.sendall(request)
        sock.close()
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", online.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sock.close()
    data = emulator.click_to_call(emulator.people["101"], "+79167654344")
    assert online.finished(data["CALL_ID"])["status_code"] == "200"
    assert not [e for e in online.pbx.log() if e["event"] == "http_error"]
    errors = stderr_of(online)
    assert errors == "", errors[-2000:]


# -- the same bounded server inside `agi-bitrix service` ----------------------------------------

def test_the_service_hosts_the_handler_on_the_same_bounded_server(tmp_path, emulator):
    from conftest import ServicePBX

    box = ServicePBX(tmp_path, emulator.webhook_url)
    box.values["events"] = {"max_connections": "2", "request_timeout": "120"}
    box.write()
    box.start()
    try:
        port = box.service.web.server_address[1]
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
        for sock in held:
            sock.sendall(b"GET / HTTP/1.0\r\n")  # headers never finished
        with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
            assert extra.recv(4096).startswith(b"HTTP/1.0 503")
        for sock in held:
            sock.close()
        box.wait_for(lambda: any(e["event"] == "http_busy_over" for e in box.log()), "the end of the busy spell")
        assert raw_post(port, b"a" + b"%5Ba%5D" * 8000 + b"=1").startswith(b"HTTP/1.0 400")
    finally:
        box.stop()
    assert [e["event"] for e in box.log() if e["event"].startswith("http_busy")] == ["http_busy", "http_busy_over"]
