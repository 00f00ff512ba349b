"""The FastAGI listener of `agi-bitrix service`: one thread per connection, a bounded number at once.

Asterisk opens a new TCP connection for every `AGI(agi://host:port/EVENT,ARG...)` and sends the
environment block: `agi_network: yes`, `agi_network_script` (everything after the URL's first
`/`, query string included), then the usual `agi_*` lines and an empty line (Asterisk
res/res_agi.c, launch_netscript and setup_env). After that the session is plain AGI. Asterisk
closes nothing by itself once the caller hung up: it waits for the server to close, so every
connection is closed here when its step ends, whatever happened.

A peer that is not Asterisk (an address not allowed, garbage, no block, a block too large, a
stall half-way) gets a log line and a closed connection, and never holds a thread for long.
Over `max_connections` a connection is answered with a `failure` line, which Asterisk turns into
AGISTATUS=FAILURE: the sample dialplan then runs the same step in process mode.
"""
from __future__ import annotations

import ipaddress
import select
import socket
import threading
import time
from typing import Any, Callable, List, Set, Tuple

from agi_bitrix.agi.session import AGISession, EnvError

MAX_ENV = 64 * 1024      # Asterisk's block is ~1 KB; a caller name is at most a few hundred bytes
ENV_TIMEOUT = 5.0        # Asterisk writes the whole block at once, right after the connect
MAX_REJECTING = 16       # connections being turned away at once (each drains the block briefly)
REJECT_DRAIN = 1.0

Handler = Callable[[AGISession, float], None]


class FastAGIServer:
    def __init__(self, listen: str, handler: Handler, logger: Callable[[], Any],
                 allowed: Callable[[], List[Any]], max_connections: Callable[[], int],
                 metrics: Any = None, env_timeout: float = ENV_TIMEOUT, max_env: int = MAX_ENV) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, int(port)))
            self.sock.listen(512)
        except OSError:
            self.sock.close()
            raise
        self.address: Tuple[str, int] = self.sock.getsockname()[:2]
        self.handler = handler
        self.logger = logger
        self.allowed = allowed
        self.max_connections = max_connections
        self.metrics = metrics
        self.env_timeout = env_timeout
        self.max_env = max_env
        self._lock = threading.Lock()
        self._threads: Set[threading.Thread] = set()
        self._active = 0
        self._rejecting = 0
        self._stopping = threading.Event()

    # -- state ------------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Connections being served now (steps in flight)."""
        with self._lock:
            return self._active

    def threads(self) -> int:
        """Threads of this server still alive (steps and rejections)."""
        with self._lock:
            return len(self._threads)

    # -- the accept loop ----------------------------------------------------------------------------
    def serve_forever(self, poll: float = 0.5) -> None:
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([self.sock], [], [], poll)
            except (OSError, ValueError):
                break
            if not ready:
                continue
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            self._admit(conn, peer[0])
        self.sock.close()

    def stop_accepting(self) -> None:
        self._stopping.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the steps in flight to finish; False if some still run after `timeout`."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            threads[0].join(min(left, 0.5))

    def _admit(self, conn: socket.socket, peer: str) -> None:
        if not self._peer_allowed(peer):
            self._log_refused(peer, "address not allowed ([service] allow)", "not_allowed")
            _close(conn)
            return
        cap = self.max_connections()
        with self._lock:
            serve = self._active < cap
            flood = not serve and self._rejecting >= MAX_REJECTING
            if serve:
                self._active += 1
            elif not flood:
                self._rejecting += 1
        if flood:
            _close(conn)  # not even a failure line: Asterisk sees the step fail and falls back
            self._log_refused(peer, f"more than {cap} connections at once and too many being turned away",
                              "busy")
            return
        if serve and self.metrics is not None:
            self.metrics.connections.inc()
        thread = threading.Thread(target=self._run, args=(self._serve if serve else self._reject, conn, peer, serve),
                                  name=f"fastagi-{peer}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _peer_allowed(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if getattr(address, "ipv4_mapped", None) is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.allowed())

    def _run(self, target: Callable[[socket.socket, str], None], conn: socket.socket, peer: str,
             served: bool) -> None:
        try:
            target(conn, peer)
        except Exception as exc:  # the listener must outlive any one connection
            self._log_refused(peer, f"internal error: {type(exc).__name__}: {exc}", "error")
        finally:
            with self._lock:
                if served:
                    self._active -= 1
                else:
                    self._rejecting -= 1
            if served and self.metrics is not None:
                self.metrics.connections.dec()
            _close(conn)  # Asterisk waits for this, even after the caller hung up
            with self._lock:
                self._threads.discard(threading.current_thread())

    # -- one connection ------------------------------------------------------------------------------
    def _serve(self, conn: socket.socket, peer: str) -> None:
        started = time.monotonic()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            session = AGISession.from_socket(conn, self.max_env, self.env_timeout)
        except EnvError as exc:
            self._log_refused(peer, str(exc), "bad_peer")
            return
        try:
            if session.env.get("agi_network") != "yes":
                self._log_refused(peer, "not a FastAGI environment block (no `agi_network: yes`)", "bad_peer")
                return
            self.handler(session, started)
        finally:
            session.close()

    def _reject(self, conn: socket.socket, peer: str) -> None:
        """Over the limit: read the block (so the answer is not lost to a reset), answer `failure`."""
        cap = self.max_connections()
        self._log_refused(peer, f"more than {cap} call steps at once ([service] max_connections): "
                          "answered `failure`, the dialplan runs the step in process mode", "busy")
        try:
            AGISession.from_socket(conn, self.max_env, REJECT_DRAIN).close()
        except EnvError:
            return
        try:
            conn.sendall(b"failure\n")
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _log_refused(self, peer: str, reason: str, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(kind).inc()
        try:
            self.logger().warning("fastagi_refused", peer=peer, reason=reason)
        except Exception:
            pass


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
