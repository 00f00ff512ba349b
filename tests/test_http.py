"""Both ways to the portal (bitrix/http.py: the service's pool, a process-mode step's direct
connection) give the same answers and the same errors, and go through a proxy the environment
names, as requests did."""
from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, List
from urllib.parse import urlsplit

import pytest

from agi_bitrix.bitrix.auth import WebhookAuth
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.bitrix.errors import NetworkError
from agi_bitrix.bitrix.http import Direct, Pool
from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator

TRANSPORTS = pytest.mark.parametrize("transport", [Pool, Direct], ids=["pool", "direct"])


@pytest.fixture
def emu() -> Iterator[Bitrix24Emulator]:
    with Bitrix24Emulator() as emulator:
        emulator.add_user("Anna", "Test", inner="101")
        yield emulator


@pytest.fixture
def no_proxy_env(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


class JSONHandler(BaseHTTPRequestHandler):
    """A test server's handler: answer() sends a JSON body; nothing is logged."""

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class ForwardProxy:
    """A plain HTTP forward proxy on 127.0.0.1 that notes each request it forwards."""

    def __init__(self) -> None:
        self.seen: List[str] = []
        outer = self

        class Handler(JSONHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.seen.append(self.path)
                target = urlsplit(self.path)
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                upstream.request("POST", target.path, body, {"Content-Type": self.headers["Content-Type"]})
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                self.answer(answer.status, data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TLSPortal:
    """An https server on 127.0.0.1 with a certificate of its own (no public CA knows it)."""

    def __init__(self, folder) -> None:
        self.cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(self.cert), "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)

        class Handler(JSONHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer(200, b'{"result": {"scope": ["telephony"]}}')

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(str(self.cert), str(key))
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = "https://localhost:%d/rest/1/code/" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def client(url: str, transport: type, timeout: float = 30) -> Bitrix24:
    return Bitrix24(WebhookAuth(url), timeout=timeout, session=transport())


@TRANSPORTS
def test_the_same_answer_either_way(emu, transport, no_proxy_env):
    b24 = client(emu.webhook_url, transport)
    assert b24.call("user.get", {"FILTER": {"UF_PHONE_INNER": "101"}})[0]["NAME"] == "Anna"
    assert b24.call("user.get", {"FILTER": {"UF_PHONE_INNER": "101"}})[0]["NAME"] == "Anna"  # kept alive
    with pytest.raises(Exception) as refused:
        b24.call("no.such.method")
    assert type(refused.value).__name__ == "NotFoundError"


@TRANSPORTS
def test_a_proxy_named_by_the_environment_is_used_unless_the_host_bypasses_it(emu, transport, no_proxy_env):
    proxy = ForwardProxy()
    try:
        no_proxy_env.setenv("http_proxy", proxy.url)
        assert client(emu.webhook_url, transport).call("user.get", {"FILTER": {"UF_PHONE_INNER": "101"}})
        assert proxy.seen == [emu.webhook_url + "user.get"]
        no_proxy_env.setenv("no_proxy", "127.0.0.1")
        assert client(emu.webhook_url, transport).call("user.get", {"FILTER": {"UF_PHONE_INNER": "101"}})
        assert len(proxy.seen) == 1
    finally:
        proxy.close()


@TRANSPORTS
def test_a_refused_connection_and_a_silent_portal_are_told_apart(transport, no_proxy_env):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(NetworkError) as refused:
            client(f"http://127.0.0.1:{port}/rest/1/code/", transport).call("scope")
    assert (refused.value.code, refused.value.cause) == ("UNREACHABLE", "refused")
    assert f"refused the connection on port {port}" in refused.value.description
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the connection is made, no answer ever comes
        with pytest.raises(NetworkError) as late:
            client("http://127.0.0.1:%d/rest/1/code/" % silent.getsockname()[1], transport, timeout=0.5).call("scope")
    assert (late.value.code, late.value.cause) == ("TIMEOUT", "timeout")


@TRANSPORTS
def test_a_certificate_is_checked_against_the_bundle_requests_used(transport, no_proxy_env, tmp_path):
    portal = TLSPortal(tmp_path)
    try:
        no_proxy_env.delenv("REQUESTS_CA_BUNDLE", raising=False)
        no_proxy_env.delenv("CURL_CA_BUNDLE", raising=False)
        with pytest.raises(NetworkError) as refused:  # certifi's bundle does not know this portal
            client(portal.url, transport).call("scope")
        assert refused.value.cause == "tls" and "TLS handshake with localhost failed" in refused.value.description
        no_proxy_env.setenv("REQUESTS_CA_BUNDLE", str(portal.cert))
        assert client(portal.url, transport).call("scope") == {"scope": ["telephony"]}
    finally:
        portal.close()
