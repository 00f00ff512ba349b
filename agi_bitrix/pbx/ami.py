"""A small threaded Asterisk Manager Interface (AMI) client: originate calls, read states.

Why our own: the project is synchronous (one AGI script per call step, plus long-running
`dialer run` / `worker` loops), so asyncio panoramisk would drag an event loop into every caller,
and pyst2's Manager matches responses in FIFO order instead of by ActionID (concurrent callers get
each other's answers), its reader dies on the first `ChanVariable` event (then every call hangs)
and it never reconnects. Ours: one reader thread, ActionID routing, strict header checks, and a
reconnect (banner + Login) on the next action after the socket drops.

Wire facts it relies on (Asterisk main/manager.c): `Key: value` lines, CRLF, a blank line ends a
message; no escaping exists, so CR/LF/NUL in a value is refused before anything is sent; lines
over 1024 bytes and headers beyond 128 are silently dropped by Asterisk, so they are refused too.
"""
from __future__ import annotations

import fnmatch
import logging
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

__all__ = [
    "AMIError", "AMIAuthError", "AMIConnectionError", "AMITimeout",
    "Message", "OriginateResult", "PendingOriginate", "AMIClient",
    "REASON_TEXT", "encode_message", "quote_variable",
]

log = logging.getLogger(__name__)

BANNER_PREFIX = "Asterisk Call Manager/"
MAX_LINE_BYTES = 1024         # manager.c: a longer input line makes Asterisk discard the message
MAX_HEADERS = 128             # manager.c keeps only the first 128 headers of an action
MAX_UNIQUEID = 149            # ChannelId / OtherChannelId limit
_MAX_BUFFER = 1 << 20         # a peer that never sends a newline is not an AMI
REPEATABLE = frozenset({"variable", "chanvariable"})

# Originate Reason (old control-frame codes: Asterisk main/pbx.c pbx_dial_reason).
REASON_TEXT: Dict[int, str] = {
    0: "failure", 1: "hangup", 3: "no answer", 4: "answered", 5: "busy", 8: "congestion",
}

_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# DEVICE_STATE(<device>) is a dialplan function call: keep its argument from adding arguments.
_DEVICE = re.compile(r"[^\s(),${}\[\]\"\\]+")

HeadersArg = Union[Dict[str, str], Iterable[Tuple[str, str]], None]


class AMIError(Exception):
    """Any AMI failure; the message is one plain line."""


class AMIAuthError(AMIError):
    """Login refused."""


class AMIConnectionError(AMIError):
    """Cannot connect, or the connection was lost (and reconnect failed or is disabled)."""


class AMITimeout(AMIError):
    """No response in time."""


@dataclass
class Message:
    """One AMI message; header order and repeats are kept (ChanVariable, Variable)."""

    headers: List[Tuple[str, str]] = field(default_factory=list)
    # Filled by AMIClient.action() for list actions ("EventList: start" ... "EventList: Complete").
    events: List["Message"] = field(default_factory=list, repr=False, compare=False)
    complete: Optional["Message"] = field(default=None, repr=False, compare=False)

    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        """The first header named `key` (case-insensitive), as Asterisk reads headers."""
        key = key.lower()
        for name, value in self.headers:
            if name.lower() == key:
                return value
        return default

    def getall(self, key: str) -> List[str]:
        key = key.lower()
        return [value for name, value in self.headers if name.lower() == key]

    @property
    def name(self) -> Optional[str]:
        """The event name, None for a response."""
        return self.get("Event")

    @property
    def response(self) -> Optional[str]:
        return self.get("Response")

    @property
    def action_id(self) -> Optional[str]:
        return self.get("ActionID")

    @property
    def is_event(self) -> bool:
        # OriginateResponse carries both Event and Response: Event decides.
        return self.get("Event") is not None


@dataclass
class OriginateResult:
    success: bool
    reason: int
    reason_text: str
    channel: str
    uniqueid: str            # as sent: "<unknown>" for a failed call without ChannelId
    action_id: str
    response: Optional[Message]

    @classmethod
    def from_event(cls, event: Message) -> "OriginateResult":
        try:
            reason = int(event.get("Reason", "0") or "0")
        except ValueError:
            reason = 0
        return cls(
            success=(event.get("Response", "") or "").lower() == "success",
            reason=reason,
            reason_text=REASON_TEXT.get(reason, f"reason {reason}"),
            channel=event.get("Channel", "") or "",
            uniqueid=event.get("Uniqueid", "") or "",
            action_id=event.action_id or "",
            response=event,
        )


def _as_pairs(headers: HeadersArg) -> List[Tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return [(k, v) for k, v in headers]


def encode_message(headers: Iterable[Tuple[str, str]]) -> bytes:
    """Frame one message; ValueError if anything could split or be dropped by Asterisk."""
    lines: List[bytes] = []
    for name, value in headers:
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"bad AMI header name {name!r}")
        if not isinstance(value, str):
            raise TypeError(f"AMI header {name} must be str, not {type(value).__name__}")
        if "\r" in value or "\n" in value or "\0" in value:
            # No escaping exists in AMI: CR/LF would start a new header or a new action.
            raise ValueError(f"AMI header {name} contains CR, LF or NUL")
        line = f"{name}: {value}\r\n".encode("utf-8")
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(f"AMI header {name} is too long ({len(line)} > {MAX_LINE_BYTES} bytes)")
        lines.append(line)
    if len(lines) > MAX_HEADERS:
        raise ValueError(f"too many AMI headers ({len(lines)} > {MAX_HEADERS})")
    return b"".join(lines) + b"\r\n"


def quote_variable(name: str, value: str) -> str:
    """`NAME="value"` for one Originate Variable header.

    Asterisk splits a Variable header at commas outside quotes and strips quotes/backslashes
    (Asterisk main/manager.c action_originate: `C="x,y"` -> `x,y`), so the whole value is quoted and `\\` `"` escaped.
    """
    if not isinstance(name, str) or not _VAR_NAME.fullmatch(name):
        raise ValueError(f"bad channel variable name {name!r}")
    if not isinstance(value, str):
        raise TypeError(f"channel variable {name} must be str, not {type(value).__name__}")
    return name + '="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Conn:
    """One TCP session: socket, read buffer, write lock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.alive = True
        self.write_lock = threading.Lock()
        self.reader: Optional[threading.Thread] = None
        self.version = ""

    def send(self, data: bytes) -> None:
        with self.write_lock:
            self.sock.sendall(data)

    def read_line(self, deadline: Optional[float]) -> Optional[str]:
        """One line without its terminator; None at EOF. Accepts CRLF and bare LF."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                raw, self.buf = self.buf[:i], self.buf[i + 1:]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                return raw.decode("utf-8", "replace")
            if len(self.buf) > _MAX_BUFFER:
                raise OSError("AMI line too long")
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("timed out")
                self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                if deadline is None and self.alive:
                    continue  # the reader waits forever; the timeout only guards sendall
                raise
            if not chunk:
                return None
            self.buf += chunk

    def read_message(self, deadline: Optional[float]) -> Optional[Message]:
        headers: List[Tuple[str, str]] = []
        while True:
            line = self.read_line(deadline)
            if line is None:
                return None
            if line == "":
                if headers:
                    return Message(headers)
                continue  # stray blank line between messages
            name, sep, value = line.partition(":")
            if not sep:
                log.debug("AMI line without ':' ignored: %.60r", line)
                continue
            headers.append((name.strip(), value[1:] if value.startswith(" ") else value))


class _Waiter:
    def __init__(self, conn: _Conn, name: str) -> None:
        self.conn = conn
        self.name = name
        self.done = threading.Event()
        self.response: Optional[Message] = None
        self.listing = False
        self.error: Optional[AMIError] = None


class PendingOriginate:
    """An Async Originate that was queued; `wait()` for its OriginateResponse event.

    It stays registered until that event arrives or the connection drops (then wait() raises
    AMIConnectionError: the call may still happen, but its result can no longer be seen).
    """

    def __init__(self, action_id: str, channel_id: Optional[str] = None) -> None:
        self.action_id = action_id
        self.channel_id = channel_id
        self._done = threading.Event()
        self._result: Optional[OriginateResult] = None
        self._error: Optional[AMIError] = None
        self._conn: Optional[_Conn] = None

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> OriginateResult:
        if not self._done.wait(timeout):
            raise AMITimeout(f"no OriginateResponse for {self.action_id} within {timeout:g}s")
        if self._error is not None:
            raise type(self._error)(str(self._error))
        assert self._result is not None
        return self._result

    def _resolve(self, result: OriginateResult) -> None:
        self._result = result
        self._done.set()

    def _fail(self, error: AMIError) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()


class AMIClient:
    """Thread-safe AMI client: any thread may call action(); one reader thread routes replies."""

    def __init__(self, host: str, port: int, username: str, secret: str, *, timeout: float = 5.0,
                 reconnect: bool = True, events: str = "call,system") -> None:
        self.host = host
        self.port = int(port)
        self.username = username
        self.secret = secret
        self.timeout = float(timeout)
        self.reconnect = reconnect
        self.events = events
        self._connect_lock = threading.RLock()   # one connect/reconnect at a time
        self._state = threading.Lock()           # waiters, originates, handlers
        self._conn: Optional[_Conn] = None
        self._waiters: Dict[str, _Waiter] = {}
        self._originates: Dict[str, PendingOriginate] = {}
        self._handlers: List[Tuple[str, Callable[[Message], None]]] = []
        self._readers: Set[threading.Thread] = set()  # to refuse action() from callbacks
        self._ever_connected = False
        self._closed = False
        self._prefix = "agib-" + secrets.token_hex(4)
        self._seq = 0

    # -- connection ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.alive

    @property
    def version(self) -> str:
        """AMI version from the banner of the current connection ('' when not connected)."""
        conn = self._conn
        return conn.version if conn else ""

    def connect(self) -> None:
        """Banner check and Login; AMIAuthError if refused, AMIConnectionError otherwise."""
        with self._connect_lock:
            self._closed = False
            if not self.connected:
                self._open()

    def _open(self) -> _Conn:
        where = f"{self.host}:{self.port}"
        deadline = time.monotonic() + self.timeout
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise AMIConnectionError(f"cannot connect to AMI at {where}: {exc}") from None
        conn = _Conn(sock)
        try:
            banner = conn.read_line(deadline)
            if banner is None:
                raise AMIConnectionError(f"AMI at {where} closed the connection before the banner")
            if not banner.startswith(BANNER_PREFIX):
                raise AMIConnectionError(f"{where} is not an Asterisk AMI (banner {banner[:60]!r})")
            conn.version = banner[len(BANNER_PREFIX):].strip()
            aid = self._next_id()
            conn.send(encode_message([
                ("Action", "Login"), ("ActionID", aid), ("Username", self.username),
                ("Secret", self.secret), ("Events", self.events)]))
            while True:  # nothing but the Login answer is expected before authentication
                msg = conn.read_message(deadline)
                if msg is None:
                    raise AMIConnectionError(f"AMI at {where} closed the connection during Login")
                if not msg.is_event and msg.action_id == aid:
                    break
            if (msg.response or "").lower() != "success":
                raise AMIAuthError(f"AMI login refused for user {self.username!r} at {where}: "
                                   f"{msg.get('Message') or msg.response}")
        except socket.timeout:
            _close_socket(sock)
            raise AMIConnectionError(f"AMI at {where} did not answer the banner/Login in "
                                     f"{self.timeout:g}s") from None
        except (ValueError, TypeError):
            _close_socket(sock)
            raise
        except AMIError:
            _close_socket(sock)
            raise
        except OSError as exc:
            _close_socket(sock)
            raise AMIConnectionError(f"AMI connection to {where} failed: {exc}") from None
        # sendall from action() is bounded by this; the reader ignores recv timeouts.
        sock.settimeout(self.timeout)
        conn.reader = threading.Thread(target=self._read_loop, args=(conn,),
                                       name=f"ami-reader-{where}", daemon=True)
        with self._state:
            self._conn = conn
            self._readers.add(conn.reader)
        self._ever_connected = True
        conn.reader.start()
        log.info("AMI connected to %s (AMI %s) as %s", where, conn.version, self.username)
        return conn

    def _ensure_connected(self) -> _Conn:
        with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.alive:
                return conn
            if self._closed:
                raise AMIConnectionError("AMI client is closed")
            if self._ever_connected and not self.reconnect:
                raise AMIConnectionError(f"AMI connection to {self.host}:{self.port} lost "
                                         "(reconnect disabled)")
            return self._open()

    def close(self) -> None:
        """Logoff if possible, then drop the socket and stop the reader thread."""
        with self._connect_lock:
            self._closed = True
            conn = self._conn
        if conn is None:
            return
        if conn.alive and threading.current_thread() is not conn.reader:
            try:
                self._request("Logoff", [], min(self.timeout, 1.0), conn=conn)
            except AMIError:
                pass
        self._drop(conn, "AMI client closed")
        if conn.reader is not None and conn.reader is not threading.current_thread():
            conn.reader.join(self.timeout)

    def __enter__(self) -> "AMIClient":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drop(self, conn: _Conn, reason: str) -> None:
        """Mark a connection dead and fail everyone still waiting on it."""
        with self._state:
            if not conn.alive:
                return
            conn.alive = False
            if self._conn is conn:
                self._conn = None
            waiters = [(k, w) for k, w in self._waiters.items() if w.conn is conn]
            for k, _ in waiters:
                del self._waiters[k]
            pending = [(k, p) for k, p in self._originates.items() if p._conn is conn]
            for k, _ in pending:
                del self._originates[k]
        _close_socket(conn.sock)
        for _, w in waiters:
            w.error = AMIConnectionError(f"{reason} while waiting for {w.name}")
            w.done.set()
        for _, p in pending:
            p._fail(AMIConnectionError(f"{reason} before OriginateResponse {p.action_id}"))
        if not self._closed:
            log.warning("AMI connection lost: %s", reason)

    # -- reader -------------------------------------------------------------------------------

    def _read_loop(self, conn: _Conn) -> None:
        reason = "AMI closed the connection"
        try:
            while conn.alive:
                msg = conn.read_message(None)
                if msg is None:
                    break
                self._dispatch(msg)
        except (OSError, ValueError) as exc:
            reason = f"AMI connection error: {exc}"
        except Exception:  # never leave waiters hanging because of a bug here
            log.exception("AMI reader crashed")
            reason = "AMI reader crashed"
        self._drop(conn, reason)
        with self._state:
            self._readers.discard(threading.current_thread())

    def _dispatch(self, msg: Message) -> None:
        aid = msg.action_id
        if not msg.is_event:
            with self._state:
                w = self._waiters.get(aid) if aid else None
                if w is None:
                    log.debug("AMI response for unknown ActionID %r dropped", aid)
                    return
                w.response = msg
                if (msg.get("EventList") or "").lower() == "start":
                    w.listing = True     # wait for the list's events and its Complete marker
                    return
                del self._waiters[aid]
            w.done.set()
            return
        if aid:
            finished: Optional[_Waiter] = None
            pending: Optional[PendingOriginate] = None
            with self._state:
                w = self._waiters.get(aid)
                if w is not None and w.listing and w.response is not None:
                    if (msg.get("EventList") or "").lower() == "complete":
                        w.response.complete = msg
                        del self._waiters[aid]
                        finished = w
                    else:
                        w.response.events.append(msg)
                if (msg.name or "").lower() == "originateresponse":
                    pending = self._originates.pop(aid, None)
            if finished is not None:
                finished.done.set()
            if pending is not None:
                pending._resolve(OriginateResult.from_event(msg))
        name = (msg.name or "").lower()
        with self._state:
            handlers = list(self._handlers)
        for pattern, callback in handlers:
            if fnmatch.fnmatchcase(name, pattern):
                try:
                    callback(msg)
                except Exception:  # a bad callback must not kill the reader
                    log.exception("AMI event callback %r failed on %s", callback, msg.name)

    def on_event(self, pattern: str, callback: Callable[[Message], None]) -> None:
        """Call `callback(message)` for events whose name matches `pattern` (fnmatch, any case).

        Callbacks run on the reader thread: keep them short and do not call action() from them.
        """
        with self._state:
            self._handlers.append((pattern.lower(), callback))

    # -- actions ------------------------------------------------------------------------------

    def _next_id(self) -> str:
        with self._state:
            self._seq += 1
            return f"{self._prefix}-{self._seq}"

    def action(self, name: str, headers: HeadersArg = None, *,
               timeout: Optional[float] = None) -> Message:
        """Send one action and return its response (any Response: Success, Error, ...).

        A list action's items are in `.events`, its `EventList: Complete` event in `.complete`.
        """
        return self._request(name, _as_pairs(headers), timeout)

    def _request(self, name: str, pairs: List[Tuple[str, str]], timeout: Optional[float], *,
                 conn: Optional[_Conn] = None,
                 pending: Optional[PendingOriginate] = None) -> Message:
        if threading.current_thread() in self._readers:
            raise AMIError("AMI action called from an event callback (reader thread) would deadlock")
        for key, _ in pairs:
            if key.lower() in ("action", "actionid"):
                raise ValueError(f"header {key} is set by the client")
        timeout = self.timeout if timeout is None else float(timeout)
        aid = self._next_id()
        frame = encode_message([("Action", name), ("ActionID", aid), *pairs])  # validate first
        for attempt in (1, 2):
            c = conn or self._ensure_connected()
            waiter = _Waiter(c, name)
            with self._state:
                self._waiters[aid] = waiter
                if pending is not None:  # registered before sending: the event may come at once
                    pending.action_id = aid
                    pending._conn = c
                    self._originates[aid] = pending
            try:
                c.send(frame)
                break
            except OSError as exc:
                # Not delivered (or only a fragment, which Asterisk discards): safe to resend once.
                with self._state:
                    self._waiters.pop(aid, None)
                    self._originates.pop(aid, None)
                self._drop(c, f"AMI send failed: {exc}")
                if conn is not None or attempt == 2 or not self.reconnect:
                    raise AMIConnectionError(f"AMI send of {name} failed: {exc}") from None
        if not waiter.done.wait(timeout):
            with self._state:
                self._waiters.pop(aid, None)
                self._originates.pop(aid, None)   # the caller never gets this handle
            raise AMITimeout(f"no response to AMI {name} within {timeout:g}s")
        if waiter.error is not None:
            raise waiter.error
        assert waiter.response is not None
        return waiter.response

    def ping(self) -> bool:
        """True when Asterisk answers Ping; False on an error, a timeout or a lost connection."""
        try:
            return (self.action("Ping").response or "").lower() == "success"
        except AMIError:
            return False

    def originate(self, channel: str, *, context: Optional[str] = None, exten: Optional[str] = None,
                  priority: str = "1", application: Optional[str] = None,
                  data: Optional[str] = None, timeout_ms: int = 30000,
                  caller_id: Optional[str] = None, variables: Optional[Dict[str, str]] = None,
                  channel_id: Optional[str] = None, other_channel_id: Optional[str] = None,
                  account: Optional[str] = None) -> PendingOriginate:
        """Queue an Async Originate; returns after the ack. AMIError if Asterisk refuses it.

        The call's outcome is the OriginateResponse event: `PendingOriginate.wait()`. It needs the
        `call` event class at Login (the default `events`).
        """
        if "/" not in channel:
            raise ValueError(f"originate channel must be Tech/resource, got {channel!r}")
        pairs: List[Tuple[str, str]] = [("Channel", channel)]
        if application:
            if context or exten:
                raise ValueError("originate takes either application or context+exten, not both")
            pairs.append(("Application", application))
            if data is not None:
                pairs.append(("Data", data))
        else:
            if not context or not exten or not str(priority):
                raise ValueError("originate needs context, exten and priority (or application)")
            pairs += [("Context", context), ("Exten", exten), ("Priority", str(priority))]
        if int(timeout_ms) <= 0:
            raise ValueError("originate timeout_ms must be positive")
        pairs.append(("Timeout", str(int(timeout_ms))))
        if caller_id is not None:
            pairs.append(("CallerID", caller_id))
        if account is not None:
            pairs.append(("Account", account))
        for key, value in (("ChannelId", channel_id), ("OtherChannelId", other_channel_id)):
            if value is not None:
                if not value or len(value) > MAX_UNIQUEID:
                    raise ValueError(f"{key} must be 1..{MAX_UNIQUEID} characters")
                pairs.append((key, value))
        for var, value in (variables or {}).items():
            pairs.append(("Variable", quote_variable(var, value)))  # one pair per header
        pairs.append(("Async", "true"))
        pending = PendingOriginate("", channel_id)
        reply = self._request("Originate", pairs, None, pending=pending)
        if (reply.response or "").lower() != "success":
            with self._state:
                self._originates.pop(pending.action_id, None)
            raise AMIError(f"Originate {channel} refused: {reply.get('Message') or reply.response}")
        return pending

    def extension_state(self, exten: str, context: str = "default") -> Tuple[int, str]:
        """(Status, StatusText) of a hint: 0 Idle, 1 InUse, 2 Busy, 4 Unavailable, 8 Ringing, ..."""
        reply = self._checked("ExtensionState", [("Exten", exten), ("Context", context)])
        try:
            status = int(reply.get("Status", "") or "")
        except ValueError:
            raise AMIError(f"ExtensionState {exten}@{context}: bad Status "
                           f"{reply.get('Status')!r}") from None
        return status, reply.get("StatusText", "") or ""

    def device_state(self, device: str) -> str:
        """DEVICE_STATE(device): NOT_INUSE, INUSE, BUSY, UNAVAILABLE, RINGING, ... or UNKNOWN."""
        if not _DEVICE.fullmatch(device or ""):
            raise ValueError(f"bad device name {device!r}")
        reply = self._checked("Getvar", [("Variable", f"DEVICE_STATE({device})")])
        return reply.get("Value", "") or ""

    def hangup(self, channel: str, cause: Optional[int] = None) -> None:
        pairs = [("Channel", channel)]
        if cause is not None:
            pairs.append(("Cause", str(int(cause))))
        self._checked("Hangup", pairs)

    def _checked(self, name: str, pairs: List[Tuple[str, str]]) -> Message:
        reply = self._request(name, pairs, None)
        if (reply.response or "").lower() != "success":
            raise AMIError(f"AMI {name} failed: {reply.get('Message') or reply.response}")
        return reply


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
