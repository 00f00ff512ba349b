"""The bounded HTTP server behind `agi-bitrix serve`, reusable by any process that hosts a handler.

Anybody on the network can open connections to it, so nothing a client does may cost more than
a bounded share of the machine:

- at most `max_connections` connections are served at once; one more is answered `503` by the
  accepting thread at once and closed (it never gets a thread). The first refusal of a busy spell
  is logged, the spell's end once with the count, so a flood cannot flood the log;
- a connection has `request_timeout` seconds in all (a client trickling a byte at a time is cut
  off too, not only a silent one);
- a form body is bounded in size, keys and nesting; beyond that: 400 and one log line;
- a client that goes away (broken pipe, reset, timeout) is not an error and leaves no trace; any
  other exception in a handler is one log line with its reason, never a traceback on stderr.
"""
from __future__ import annotations

import errno
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Tuple

from agi_bitrix.bitrix.query import FormTooComplex, parse_php_query

BUSY_ANSWER = (b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n")
_GONE_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN, errno.ESHUTDOWN,
                errno.EBADF}


@dataclass(frozen=True)
class Limits:
    max_connections: int = 32      # connections served at once
    request_timeout: float = 10.0  # seconds a connection may take, all of it
    max_body: int = 64 * 1024      # bytes of a form body


class BadRequest(ValueError):
    """The request is not one we read (size, form, encoding): 400 and one log line."""


class ClientGone(ConnectionError):
    """The client closed the connection (or was cut off) before its request was complete."""


def client_gone(exc: BaseException) -> bool:
    """A client that went away or was too slow: normal life of a server, not an error."""
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    return isinstance(exc, OSError) and exc.errno in _GONE_ERRNOS


def read_form(handler: BaseHTTPRequestHandler) -> Dict[str, Any]:
    """The request's form-encoded body, PHP-style keys nested, within the server's bounds."""
    max_body = getattr(handler.server, "limits", Limits()).max_body
    raw = handler.headers.get("Content-Length")
    try:
        length = int(raw or "")
    except ValueError:
        raise BadRequest("no usable Content-Length") from None
    if length <= 0:
        raise BadRequest("empty body")
    if length > max_body:
        raise BadRequest(f"body of {length} bytes, over {max_body}")
    body = handler.rfile.read(length)
    if len(body) < length:
        raise ClientGone("the body ended early")
    try:
        return parse_php_query(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8") from None
    except FormTooComplex as exc:
        raise BadRequest(f"form with {exc}") from None


class _Deadlines:
    """One thread that cuts off connections older than the request timeout.

    A per-read socket timeout alone would let a client that sends a byte now and then hold a
    thread forever; shutting the socket down ends whatever read or write the handler is in.
    """

    def __init__(self, seconds: float, on_timeout: Any) -> None:
        self.seconds = seconds
        self.on_timeout = on_timeout
        self.cond = threading.Condition()
        self.due: Dict[socket.socket, Tuple[float, Any]] = {}
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="http-deadlines", daemon=True)
        self.thread.start()

    def add(self, sock: socket.socket, peer: Any) -> None:
        with self.cond:
            self.due[sock] = (time.monotonic() + self.seconds, peer)
            self.cond.notify()

    def discard(self, sock: socket.socket) -> None:
        with self.cond:
            self.due.pop(sock, None)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    def _run(self) -> None:
        with self.cond:
            while not self.closed:
                now = time.monotonic()
                late = [(sock, peer) for sock, (at, peer) in self.due.items() if at <= now]
                for sock, peer in late:
                    del self.due[sock]
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    self.on_timeout(peer)
                nearest = min((at for at, _ in self.due.values()), default=None)
                self.cond.wait(None if nearest is None else max(0.01, nearest - now))


class BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with the limits above. Build it, then serve_forever(); server_close() ends it."""

    daemon_threads = True

    def __init__(self, address: Tuple[str, int], handler: type, limits: Limits, logger: Any) -> None:
        # The kernel's queue of connections not yet accepted: a burst must reach the accepting
        # thread (and get its quick 503) instead of waiting for SYN retries.
        self.request_queue_size = max(128, limits.max_connections * 4)
        self.limits = limits
        self.logger = logger
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._lock = threading.Lock()
        self._active = 0
        self._refused = 0   # in the current busy spell; 0 = not busy
        self._timed_out = 0
        # Also each read's own timeout (StreamRequestHandler.setup applies `timeout` to the socket).
        handler = type(handler.__name__, (handler,), {"timeout": limits.request_timeout})
        super().__init__(address, handler)
        self._deadlines = _Deadlines(limits.request_timeout, self._timeout)

    # -- the cap ----------------------------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        with self._lock:
            self._active += 1
        self._deadlines.add(request, client_address)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: Any) -> None:
        self._deadlines.discard(request)
        with self._lock:
            self._active -= 1
            # The spell ends when half the slots are free again, not at the first free one:
            # under a steady flood it stays one spell (two log lines), however long it lasts.
            ended = self._refused and self._active <= self.limits.max_connections // 2
            if ended:
                refused, timed_out, self._refused, self._timed_out = self._refused, self._timed_out, 0, 0
        self._slots.release()
        if ended:
            self.logger.info("http_busy_over", refused=refused, timed_out=timed_out)

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        """Answer 503 without blocking the accepting thread, then close."""
        # Counted (and the spell's start logged) before the answer goes out: a client that sees
        # the 503 and closes its other connections at once must not end the spell before it began.
        with self._lock:
            first = self._refused == 0
            self._refused += 1
        if first:
            self.logger.warning("http_busy", reason=f"all {self.limits.max_connections} connections in use: "
                                "new ones are refused (503) until half are free",
                                peer=_peer(client_address))
        try:
            request.setblocking(False)
            try:
                request.recv(65536)  # what already arrived: closing over unread data would reset
            except OSError:
                pass
            request.send(BUSY_ANSWER)
        except OSError:
            pass
        self.shutdown_request(request)

    # -- the timeout and errors ----------------------------------------------------------------
    def _timeout(self, client_address: Any) -> None:
        with self._lock:
            busy = self._refused > 0
            if busy:
                self._timed_out += 1
        if not busy:
            self.logger.info("http_timeout", peer=_peer(client_address),
                             reason=f"the request took longer than {self.limits.request_timeout:g} s")

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if exc is None or client_gone(exc):
            return
        self.logger.error("http_error", peer=_peer(client_address), reason=f"{type(exc).__name__}: {exc}"[:300])

    def server_close(self) -> None:
        self._deadlines.close()
        super().server_close()


def _peer(client_address: Any) -> Optional[str]:
    return client_address[0] if isinstance(client_address, tuple) and client_address else None


def build(listen: str, handler: type, limits: Limits, logger: Any) -> BoundedHTTPServer:
    """A server on `host:port` (IPv6 in brackets), or OSError when it cannot listen there."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    server_class = BoundedHTTPServer
    if ":" in host:
        server_class = type("BoundedHTTPServer6", (BoundedHTTPServer,), {"address_family": socket.AF_INET6})
    return server_class((host, int(port)), handler, limits, logger)
