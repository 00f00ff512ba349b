"""The reusable bounded HTTP server, the form parser's bounds and the rationing of install proofs, in-process."""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Iterator, List

import pytest
import requests

from agi_bitrix.bitrix.install import PROOF_BURST, PROOF_EVERY, InstallBusy, ProofGate
from agi_bitrix.bitrix.query import FormTooComplex, parse_php_query
from agi_bitrix.http_server import Limits, build, read_form


class Lines:
    """A logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: List[tuple] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((level, event, fields))


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        return

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/boom":
            raise RuntimeError("a bug in a route")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self) -> None:  # noqa: N802
        form = read_form(self)
        body = repr(sorted(form)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[Any]:
    logger = Lines()
    srv = build("127.0.0.1:0", Handler, Limits(max_connections=4, request_timeout=30), logger)
    srv.log = logger
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv: Any, path: str = "/") -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def test_an_unexpected_exception_is_one_log_line_and_nothing_on_stderr(server, capfd):
    with pytest.raises(requests.ConnectionError):
        requests.get(url(server, "/boom"), timeout=10)
    assert requests.get(url(server), timeout=10).text == "ok"  # the server lives on
    errors = [line for line in server.log.lines if line[1] == "http_error"]
    assert errors == [("error", "http_error", {"peer": "127.0.0.1", "reason": "RuntimeError: a bug in a route"})]
    assert capfd.readouterr().err == ""


def test_the_form_is_read_within_its_bounds(server):
    answer = requests.post(url(server), data={"event": "X", "data[CALL_ID]": "1"}, timeout=10)
    assert answer.text == "['data', 'event']"


def test_the_cap_refuses_at_once_and_frees_again(server):
    held = [socket.create_connection(server.server_address, timeout=10) for _ in range(4)]
    for sock in held:
        sock.sendall(b"GET / HTTP/1.0\r\n")  # headers never finished
    with socket.create_connection(server.server_address, timeout=10) as extra:
        answer = extra.recv(4096)
    assert answer.startswith(b"HTTP/1.0 503")
    for sock in held:
        sock.close()
    end = time.time() + 30
    while not any(line[1] == "http_busy_over" for line in server.log.lines):
        assert time.time() < end, server.log.lines
        time.sleep(0.02)
    assert requests.get(url(server), timeout=10).text == "ok"
    assert [line[1] for line in server.log.lines] == ["http_busy", "http_busy_over"]


def test_parser_bounds():
    assert parse_php_query("auth[member_id]=m&data[CRM_CREATED_ENTITIES][0][ENTITY_ID]=5") == {
        "auth": {"member_id": "m"}, "data": {"CRM_CREATED_ENTITIES": [{"ENTITY_ID": "5"}]}}
    with pytest.raises(FormTooComplex):
        parse_php_query("a" + "[a]" * 20000 + "=1")  # was a RecursionError
    with pytest.raises(FormTooComplex):
        parse_php_query("&".join(f"k{i}=1" for i in range(1001)))
    assert len(parse_php_query("&".join(f"k{i}=1" for i in range(1000)))) == 1000


def test_proofs_are_rationed():
    now = [0.0]
    gate = ProofGate(clock=lambda: now[0])
    for _ in range(PROOF_BURST):
        gate.take()
    with pytest.raises(InstallBusy):
        gate.take()
    now[0] += PROOF_EVERY
    gate.take()
    with pytest.raises(InstallBusy):
        gate.take()
