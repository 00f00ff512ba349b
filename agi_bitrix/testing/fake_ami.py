"""A strict fake Asterisk Manager Interface (AMI) server for tests.

It frames and words its answers like Asterisk 22.10.1 did in captured lab frames (Originate ack,
OriginateResponse success/busy) and like Asterisk's main/manager.c for the rest, including the
write classes a user needs for each action ("Permission denied", ListCommands), and it records
every client mistake a real Asterisk would silently punish in `violations`: a stray CR inside a value, an action without ActionID, a line over
1024 bytes (Asterisk discards the whole message), more than 128 headers (the rest are ignored).

Calls are not real: `on_originate` decides each Originate's outcome (default: answered after
0.05 s) and the fake emits Newchannel/Newstate/Hangup/OriginateResponse as Asterisk would.
Standard library only.
"""
from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

from agi_bitrix.pbx.ami import Message

__all__ = ["FakeAMI", "OriginateOutcome", "originate_variables", "split_app_args",
           "STATUS_TEXT", "DEVICE_STATES"]

# The fixtures (Asterisk 22.10.1) do not show the greeting; 22.x reports AMI 11.0.0
# (main/manager.c on master says 13.0.0). Clients must not depend on it.
AMI_VERSION = "11.0.0"
MAX_LINE = 1024        # bytes including the line terminator
MAX_HEADERS = 128
MAX_UNIQUEID = 149
READ_CLASSES = frozenset({"call", "system", "user"})   # manager.conf `read` of the lab user
WRITE_CLASSES = frozenset({"call", "originate", "reporting"})  # its `write`: no `system`
# The write classes an action needs, any one of them (main/manager.c registration); () = anyone.
ACTION_AUTHORITY: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "login": ((), "Login Manager"),
    "logoff": ((), "Logoff Manager"),
    "ping": ((), "Keepalive command"),
    "listcommands": ((), "List available manager commands"),
    "originate": (("originate",), "Originate a call"),
    "extensionstate": (("call", "reporting"), "Check Extension Status"),
    "getvar": (("call", "reporting"), "Gets a channel variable or function value"),
    "hangup": (("system", "call"), "Hangup channel"),
    "coreshowchannels": (("system", "reporting"), "List currently active channels"),
}
_ACTION_NAMES = {"login": "Login", "logoff": "Logoff", "ping": "Ping", "listcommands": "ListCommands",
                 "originate": "Originate", "extensionstate": "ExtensionState", "getvar": "Getvar",
                 "hangup": "Hangup", "coreshowchannels": "CoreShowChannels"}

STATUS_TEXT: Dict[int, str] = {
    0: "Idle", 1: "InUse", 2: "Busy", 4: "Unavailable", 8: "Ringing",
    9: "InUse&Ringing", 16: "Hold", 17: "InUse&Hold",
}
DEVICE_STATES = ("UNKNOWN", "NOT_INUSE", "INUSE", "BUSY", "INVALID", "UNAVAILABLE",
                 "RINGING", "RINGINUSE", "ONHOLD")
# Originate Reason -> the Hangup cause the dialled channel gets (main/channel.c texts).
_REASON_CAUSE = {3: (19, "User alerting, no answer"), 5: (17, "User busy"),
                 8: (34, "Circuit/channel congestion"), 1: (16, "Normal Clearing")}
# Application-style Originate that needs `system` write, which the lab user lacks.
_APP_NEEDS_SYSTEM = ("agi", "exec", "system", "mixmonitor", "originate", "reload",
                     "dbdeltree", "externalivr")
_DATA_NEEDS_SYSTEM = ("SHELL", "FILE", "DB", "EVAL", "CURL", "ODBC", "REALTIME")
_INT = re.compile(r"\s*[+-]?\d+")   # sscanf("%30d") accepts a numeric prefix

Headers = Union[Dict[str, str], Iterable[Tuple[str, str]]]


@dataclass
class OriginateOutcome:
    reason: int = 4            # 4 answered, 5 busy, 3 no answer, 8 congestion, 0 failure
    delay: float = 0.05        # seconds until the OriginateResponse
    on_answer: Optional[Callable[[], None]] = None   # run in a thread once answered; the call
    #                                                   hangs up (cause 16) when it returns


def split_app_args(text: str, delim: str = ",") -> List[str]:
    """Split like Asterisk's AST_STANDARD_APP_ARGS: quotes and backslashes are removed,
    delimiters inside quotes or (), [], {} do not split."""
    args: List[str] = []
    cur: List[str] = []
    quote = False
    paren = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "([{":
            paren += 1
            cur.append(ch)
        elif ch in ")]}":
            if paren:
                paren -= 1
            cur.append(ch)
        elif ch == '"':
            quote = not quote
        elif ch == "\\":
            i += 1
            if i < len(text):
                cur.append(text[i])
        elif ch == delim and not quote and not paren:
            args.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    args.append("".join(cur))
    return args


def originate_variables(message: Message) -> List[Tuple[str, str]]:
    """The channel variables Asterisk would set from an Originate's Variable headers."""
    out: List[Tuple[str, str]] = []
    for header in message.getall("Variable"):
        for arg in split_app_args(header):
            name, sep, value = arg.partition("=")
            if sep and name:
                out.append((name, value))
    return out


def _parse_callerid(cid: str) -> Tuple[str, str]:
    """(num, name) from `"Name" <num>` / `Name <num>` / `num`; missing parts are <unknown>."""
    cid = cid.strip()
    m = re.fullmatch(r'"?([^"<]*?)"?\s*<([^>]*)>', cid)
    if m:
        name, num = m.group(1).strip(), m.group(2).strip()
    elif re.fullmatch(r"[0-9+*#]+", cid):
        name, num = "", cid
    else:
        name, num = cid, ""
    return num or "<unknown>", name or "<unknown>"


def _truthy(value: Optional[str]) -> bool:   # ast_true
    return (value or "").strip().lower() in ("yes", "true", "y", "t", "1", "on")


@dataclass
class _Channel:
    name: str
    uniqueid: str
    linkedid: str
    cid_num: str
    cid_name: str
    account: str
    context: str
    exten: str
    priority: str
    state: int = 0            # 0 Down, 5 Ringing, 6 Up
    variables: Optional[Dict[str, str]] = None

    def fields(self) -> List[Tuple[str, str]]:
        desc = {0: "Down", 5: "Ringing", 6: "Up"}.get(self.state, "Unknown")
        return [("Channel", self.name), ("ChannelState", str(self.state)),
                ("ChannelStateDesc", desc), ("CallerIDNum", self.cid_num),
                ("CallerIDName", self.cid_name), ("ConnectedLineNum", "<unknown>"),
                ("ConnectedLineName", "<unknown>"), ("Language", "en"),
                ("AccountCode", self.account), ("Context", self.context), ("Exten", self.exten),
                ("Priority", self.priority), ("Uniqueid", self.uniqueid),
                ("Linkedid", self.linkedid)]


class _Session:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.authenticated = False
        self.classes: Set[str] = set()
        self.open = True

    def send(self, headers: List[Tuple[str, str]], then_authenticated: bool = False) -> None:
        data = "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        self.send_raw(data.encode("utf-8"), then_authenticated)

    def send_raw(self, data: bytes, then_authenticated: bool = False) -> None:
        with self.lock:
            if not self.open:
                return
            # Set before the bytes go out: an event broadcast now waits on this lock, so it
            # follows the Login answer instead of being skipped.
            self.authenticated = self.authenticated or then_authenticated
            try:
                self.sock.sendall(data)
            except OSError:
                self.close_locked()

    def close(self) -> None:
        with self.lock:
            self.close_locked()

    def close_locked(self) -> None:
        if self.open:
            self.open = False
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class FakeAMI:
    """A fake AMI on 127.0.0.1 speaking like Asterisk 22, strict about client mistakes."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, username: str = "crm",
                 secret: str = "change-me", version: str = AMI_VERSION,
                 auth_fail_delay: float = 1.0,
                 dialplan: Optional[Dict[str, Iterable[str]]] = None,
                 read: Iterable[str] = READ_CLASSES, write: Iterable[str] = WRITE_CLASSES) -> None:
        self.host = host
        self._port = port
        self.username = username
        self.secret = secret
        prefix = "Asterisk Call Manager/"
        self.banner = version if version.startswith(prefix) else prefix + version
        self.auth_fail_delay = auth_fail_delay
        self.read = frozenset(read)     # manager.conf `read =` and `write =` of the user
        self.write = frozenset(write)
        # {context: extens}; None = every Context/Exten exists (an empty one never does).
        self.dialplan = ({c: set(e) for c, e in dialplan.items()} if dialplan is not None else None)
        self.actions: List[Message] = []
        self.originates: List[Message] = []
        self.violations: List[str] = []
        self.logins = 0
        self.failed_logins = 0
        self.globals: Dict[str, str] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._threads: List[threading.Thread] = []
        self._sessions: List[_Session] = []
        self._hints: Dict[Tuple[str, str], Tuple[int, str]] = {}
        self._devices: Dict[str, str] = {}
        self._channels: Dict[str, _Channel] = {}
        self._handler: Optional[Callable[[Message], Optional[OriginateOutcome]]] = None
        self._delays: Dict[str, float] = {}
        self._chan_seq = 0
        self._uid_seq = 0
        self._epoch = int(time.time())
        self._started = time.time()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "FakeAMI":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        sock.listen(16)
        sock.settimeout(0.05)   # the accept loop polls so stop() never hangs
        self._listener = sock
        self._port = sock.getsockname()[1]
        self._spawn(self._accept_loop, "fake-ami-accept")
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        self.drop_connections()
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(2.0)

    def __enter__(self) -> "FakeAMI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> Tuple[str, int]:
        return self.host, self._port

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _sleep(self, seconds: float) -> bool:
        """False when the server is stopping."""
        return not self._stopping.wait(max(0.0, seconds))

    # -- test controls ------------------------------------------------------------------------

    def set_extension_state(self, exten: str, status: int, context: str = "default",
                            hint: Optional[str] = None) -> None:
        """Set a hint's state (0 idle, 1 inuse, 2 busy, 4 unavailable, 8 ringing, ...)."""
        with self._lock:
            old_hint = self._hints.get((context, exten), (0, f"PJSIP/{exten}"))[1]
            hint = hint or old_hint
            self._hints[(context, exten)] = (int(status), hint)
        self._broadcast([("Event", "ExtensionStatus"), ("Privilege", "call,all"),
                         ("Exten", exten), ("Context", context), ("Hint", hint),
                         ("Status", str(int(status))),
                         ("StatusText", STATUS_TEXT.get(int(status), "Unknown"))])

    def set_device_state(self, device: str, state: str) -> None:
        if state not in DEVICE_STATES:
            raise ValueError(f"unknown device state {state!r}; one of {', '.join(DEVICE_STATES)}")
        with self._lock:
            self._devices[device] = state
        self._broadcast([("Event", "DeviceStateChange"), ("Privilege", "call,all"),
                         ("Device", device), ("State", state)])

    def on_originate(self, handler: Callable[[Message], Optional[OriginateOutcome]]) -> None:
        """`handler(originate_action)` decides the call's outcome; None = answered after 0.05 s."""
        self._handler = handler

    def set_action_delay(self, action: str, seconds: float) -> None:
        """Answer `action` after `seconds` from another thread, so later actions overtake it."""
        with self._lock:
            self._delays[action.lower()] = seconds

    def drop_connections(self) -> None:
        """Simulate an Asterisk restart: close every client socket."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for sess in sessions:
            sess.close()

    def emit(self, headers: Headers) -> None:
        """Push an arbitrary event to every logged-in client (event masks ignored)."""
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
        with self._lock:
            sessions = [s for s in self._sessions if s.authenticated]
        for sess in sessions:
            sess.send(pairs)

    @property
    def channels(self) -> List[str]:
        """Names of the channels currently up (answered originates)."""
        with self._lock:
            return list(self._channels)

    def hangup(self, channel: str, cause: int = 16) -> bool:
        """End a live channel as if the far end hung up (Hangup event); False if unknown."""
        with self._lock:
            chan = self._channels.pop(channel, None)
        if chan is None:
            return False
        self._emit_hangup(chan, cause, "Normal Clearing" if cause == 16 else f"Cause {cause}")
        return True

    def _violation(self, text: str) -> None:
        with self._lock:
            self.violations.append(text)

    # -- network ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sess = _Session(sock)
            with self._lock:
                self._sessions.append(sess)
            self._spawn(self._serve, "fake-ami-session", sess)

    def _serve(self, sess: _Session) -> None:
        sess.send_raw((self.banner + "\r\n").encode("utf-8"))
        try:
            for lines in self._read_messages(sess):
                self._handle(sess, lines)
                if not sess.open:
                    break
        except OSError:
            pass
        finally:
            sess.close()
            with self._lock:
                if sess in self._sessions:
                    self._sessions.remove(sess)

    def _read_messages(self, sess: _Session) -> Iterator[List[bytes]]:
        """Messages as lists of raw lines; over-long lines discard their message, like manager.c."""
        buf = b""
        lines: List[bytes] = []
        too_long = skipping = False
        while sess.open:
            i = buf.find(b"\n")
            if i < 0:
                if len(buf) >= MAX_LINE:   # no newline in 1024 bytes: Asterisk drops it all
                    too_long = skipping = True
                    buf = b""
                chunk = sess.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
                continue
            raw, buf = buf[:i + 1], buf[i + 1:]
            if skipping:          # the tail of an over-long line
                skipping = False
                continue
            if len(raw) > MAX_LINE:
                too_long = True
                continue
            line = raw[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                lines.append(line)
                continue
            if too_long:
                self._violation(f"line over {MAX_LINE} bytes: Asterisk discards the whole message")
                too_long = False
                lines = []
            elif lines:
                yield lines
                lines = []

    def _handle(self, sess: _Session, lines: List[bytes]) -> None:
        headers: List[Tuple[str, str]] = []
        for raw in lines:
            text = raw.decode("utf-8", "replace")
            name, sep, value = text.partition(":")
            if not sep:
                self._violation(f"line without ':' {text[:40]!r}")
                continue
            headers.append((name.strip(), value.lstrip(" \t")))   # astman_get_header skips blanks
        msg = Message(headers[:MAX_HEADERS])
        action = msg.get("Action") or ""
        if len(headers) > MAX_HEADERS:
            self._violation(f"{action}: {len(headers)} headers, Asterisk ignores all after "
                            f"{MAX_HEADERS}")
        for name, value in headers:
            if "\r" in value:
                self._violation(f"{action}: header {name} contains a stray CR")
        if msg.action_id is None:
            self._violation(f"{action or '(no Action)'}: no ActionID")
        if not action:
            sess.send(self._resp(msg, "Error", "Missing action in request"))
            return
        key = action.lower()
        if not sess.authenticated:
            if key == "login":
                self._login(sess, msg)
            elif key == "logoff":
                self._logoff(sess, msg)
            else:
                sess.send(self._resp(msg, "Error", "Permission denied"))
            return
        needs = ACTION_AUTHORITY.get(key, ((), ""))[0]
        if needs and not self.write & set(needs):
            sess.send(self._resp(msg, "Error", "Permission denied"))   # manager.c process_message
            return
        with self._lock:
            self.actions.append(msg)
            delay = self._delays.get(key)
        if delay:
            self._spawn(self._delayed, "fake-ami-delayed", sess, msg, delay)
        else:
            self._dispatch(sess, msg)

    def _delayed(self, sess: _Session, msg: Message, delay: float) -> None:
        if self._sleep(delay):
            self._dispatch(sess, msg)

    def _dispatch(self, sess: _Session, msg: Message) -> None:
        key = (msg.get("Action") or "").lower()
        handler = {
            "login": lambda: sess.send(self._resp(msg, "Success", "Already authenticated")),
            "logoff": lambda: self._logoff(sess, msg),
            "ping": lambda: sess.send(self._resp(msg, "Success", None, [
                ("Ping", "Pong"), ("Timestamp", f"{time.time():.6f}")])),
            "originate": lambda: self._originate(sess, msg),
            "extensionstate": lambda: self._extension_state(sess, msg),
            "getvar": lambda: self._getvar(sess, msg),
            "hangup": lambda: self._hangup_action(sess, msg),
            "coreshowchannels": lambda: self._core_show_channels(sess, msg),
            "listcommands": lambda: self._list_commands(sess, msg),
        }.get(key)
        if handler is None:
            sess.send(self._resp(msg, "Error", f"Invalid/unknown command: {msg.get('Action')}. "
                                 "Use Action: ListCommands to show available commands."))
        else:
            handler()

    @staticmethod
    def _resp(msg: Message, response: str, text: Optional[str],
              extra: Iterable[Tuple[str, str]] = ()) -> List[Tuple[str, str]]:
        out = [("Response", response)]
        if msg.action_id is not None:
            out.append(("ActionID", msg.action_id))
        if text is not None:
            out.append(("Message", text))
        out.extend(extra)
        return out

    def _broadcast(self, headers: List[Tuple[str, str]]) -> None:
        """An event to every logged-in session whose Events mask covers its class."""
        cls = (dict((k.lower(), v) for k, v in headers).get("privilege") or "").split(",")[0]
        with self._lock:
            sessions = [s for s in self._sessions
                        if s.authenticated and (not cls or cls in s.classes)]
        for sess in sessions:
            sess.send(headers)

    # -- actions ------------------------------------------------------------------------------

    def _login(self, sess: _Session, msg: Message) -> None:
        if msg.get("Username") != self.username or msg.get("Secret") != self.secret:
            with self._lock:
                self.failed_logins += 1
            self._sleep(self.auth_fail_delay)   # manager.c slows down guessing
            sess.send(self._resp(msg, "Error", "Authentication failed"))
            sess.close()
            return
        events = (msg.get("Events") or "on").strip().lower()
        if events in ("on", "yes", "true", "1"):
            sess.classes = set(self.read)
        elif events in ("off", "no", "false", "0"):
            sess.classes = set()
        else:   # the event mask is cut to the user's read classes (manager.c set_eventmask)
            sess.classes = {c.strip() for c in events.split(",")} & self.read
        with self._lock:
            self.logins += 1
        # Events only after the answer, as manager.c does, and none lost once the client has it:
        # the session turns authenticated under its send lock, with the answer as its first bytes.
        sess.send(self._resp(msg, "Success", "Authentication accepted"), then_authenticated=True)
        if "system" in sess.classes:
            up = str(int(time.time() - self._started))
            sess.send([("Event", "FullyBooted"), ("Privilege", "system,all"), ("Uptime", up),
                       ("LastReload", up), ("Status", "Fully Booted")])

    def _list_commands(self, sess: _Session, msg: Message) -> None:
        """Only the actions this user's write classes allow, one `Name: synopsis (Priv: ...)` line
        each (manager.c action_listcommands)."""
        lines = []
        for key, (needs, synopsis) in ACTION_AUTHORITY.items():
            if not needs or self.write & set(needs):
                lines.append((_ACTION_NAMES[key], f"{synopsis}. (Priv: {','.join(needs) or '<none>'})"))
        sess.send(self._resp(msg, "Success", None, lines))

    def _logoff(self, sess: _Session, msg: Message) -> None:
        sess.send(self._resp(msg, "Goodbye", "Thanks for all the fish."))
        sess.close()

    def _extension_state(self, sess: _Session, msg: Message) -> None:
        exten = msg.get("Exten") or ""
        context = msg.get("Context") or "default"
        with self._lock:
            status, hint = self._hints.get((context, exten), (-1, ""))
        sess.send(self._resp(msg, "Success", "Extension Status", [
            ("Exten", exten), ("Context", context), ("Hint", hint), ("Status", str(status)),
            ("StatusText", STATUS_TEXT.get(status, "Unknown"))]))

    def _getvar(self, sess: _Session, msg: Message) -> None:
        variable = msg.get("Variable") or ""
        if not variable:
            sess.send(self._resp(msg, "Error", "No variable specified"))
            return
        channel = msg.get("Channel") or ""
        with self._lock:
            chan = self._channels.get(channel) if channel else None
            m = re.fullmatch(r"DEVICE_STATE\((.*)\)", variable)
            if channel and chan is None:
                sess.send(self._resp(msg, "Error", "No such channel"))
                return
            if m:
                value = self._devices.get(m.group(1), "UNKNOWN")
            elif chan is not None:
                value = (chan.variables or {}).get(variable, "")
            else:
                value = self.globals.get(variable, "")
        sess.send(self._resp(msg, "Success", None, [("Variable", variable), ("Value", value)]))

    def _hangup_action(self, sess: _Session, msg: Message) -> None:
        channel = msg.get("Channel") or ""
        if not channel:
            sess.send(self._resp(msg, "Error", "No channel specified"))
            return
        cause_text = msg.get("Cause") or "16"
        cause = int(cause_text) if cause_text.isdigit() else 16
        with self._lock:
            chan = self._channels.pop(channel, None)
        if chan is None:
            sess.send(self._resp(msg, "Error", "No such channel"))
            return
        sess.send(self._resp(msg, "Success", "Channel Hungup"))
        self._emit_hangup(chan, cause, "Normal Clearing" if cause == 16 else f"Cause {cause}")

    def _core_show_channels(self, sess: _Session, msg: Message) -> None:
        aid = [("ActionID", msg.action_id)] if msg.action_id is not None else []
        with self._lock:
            chans = list(self._channels.values())
        sess.send([("Response", "Success"), *aid, ("EventList", "start"),
                   ("Message", "Channels will follow")])
        for chan in chans:
            sess.send([("Event", "CoreShowChannel"), *aid, *chan.fields(),
                       ("Application", "AppDial"), ("ApplicationData", "(Outgoing Line)"),
                       ("Duration", "00:00:01"), ("BridgeId", "")])
        sess.send([("Event", "CoreShowChannelsComplete"), *aid, ("EventList", "Complete"),
                   ("ListItems", str(len(chans)))])

    def _originate(self, sess: _Session, msg: Message) -> None:
        with self._lock:
            self.originates.append(msg)
        error = self._originate_error(msg)
        if error:
            sess.send(self._resp(msg, "Error", error))
            return
        outcome: Optional[OriginateOutcome]
        try:
            outcome = self._handler(msg) if self._handler else None
        except Exception as exc:  # a broken test handler should show up, not hang the client
            self._violation(f"on_originate handler raised {exc!r}")
            outcome = OriginateOutcome(reason=0)
        outcome = outcome or OriginateOutcome()
        if _truthy(msg.get("Async")):
            sess.send(self._resp(msg, "Success", "Originate successfully queued"))
            self._spawn(self._run_call, "fake-ami-call", msg, outcome, None)
        else:  # a synchronous Originate blocks this AMI session until the outcome, as in Asterisk
            self._run_call(msg, outcome, sess)

    def _originate_error(self, msg: Message) -> Optional[str]:
        """The checks of manager.c action_originate, in its order."""
        channel = msg.get("Channel") or ""
        app = msg.get("Application") or ""
        data = msg.get("Data") or ""
        if not channel:
            return "Channel not specified"
        if app and "system" not in self.write and (any(w in app.lower() for w in _APP_NEEDS_SYSTEM)
                                                   or any(w in data for w in _DATA_NEEDS_SYSTEM)):
            return "Originate Access Forbidden: app or data blacklisted"
        priority = msg.get("Priority") or ""
        if priority and not _INT.match(priority):
            return "Invalid priority"   # labels are unknown to the fake
        timeout = msg.get("Timeout") or ""
        if timeout and not _INT.match(timeout):
            return "Invalid timeout"
        if "/" not in channel:
            return "Invalid channel"
        for key in ("ChannelId", "OtherChannelId"):
            if len(msg.get(key) or "") > MAX_UNIQUEID:
                return f"Uniqueid length exceeds maximum of {MAX_UNIQUEID}"
        if not app:
            if not priority or int(_INT.match(priority).group()) == 0:  # type: ignore[union-attr]
                return "Originate with 'Exten' requires 'Context' and 'Priority'"
            if not self._exists(msg.get("Context") or "", msg.get("Exten") or ""):
                return "Extension does not exist."
        return None

    def _exists(self, context: str, exten: str) -> bool:
        if not context or not exten:
            return False
        return self.dialplan is None or exten in self.dialplan.get(context, set())

    def _new_channels(self, msg: Message, variables: Dict[str, str]) -> List[_Channel]:
        requested = msg.get("Channel") or ""
        num, name = _parse_callerid(msg.get("CallerID") or "")
        with self._lock:
            self._chan_seq += 1
            seq = self._chan_seq
            ids = []
            for key in ("ChannelId", "OtherChannelId"):
                self._uid_seq += 1
                ids.append(msg.get(key) or f"{self._epoch}.{self._uid_seq}")
        tech, _, rest = requested.partition("/")
        if tech.lower() == "local":   # Local/x@ctx[/opts] -> Local/x@ctx-0000000N;1 and ;2
            base = f"{tech}/{rest.split('/')[0]}-{seq:08x}"
            names = [base + ";1", base + ";2"]
        else:
            names = [f"{requested}-{seq:08x}"]
        app = msg.get("Application")
        return [_Channel(name=n, uniqueid=ids[i], linkedid=ids[0], cid_num=num, cid_name=name,
                         account=msg.get("Account") or "",
                         context="" if app else msg.get("Context") or "",
                         exten="" if app else msg.get("Exten") or "",
                         priority="1", variables=dict(variables))
                for i, n in enumerate(names)]

    def _event(self, name: str, chan: _Channel, extra: Iterable[Tuple[str, str]] = ()) -> None:
        self._broadcast([("Event", name), ("Privilege", "call,all"), *chan.fields(), *extra])

    def _emit_hangup(self, chan: _Channel, cause: int, text: str) -> None:
        self._event("Hangup", chan, [("Cause", str(cause)), ("Cause-txt", text)])

    def _run_call(self, msg: Message, outcome: OriginateOutcome, sess: Optional[_Session]) -> None:
        """Play one originated call; `sess` set = synchronous Originate waiting for its answer."""
        reason = outcome.reason
        chans = self._new_channels(msg, dict(originate_variables(msg))) if reason != 0 else []
        for chan in chans:
            self._event("Newchannel", chan)
        if not self._sleep(outcome.delay):
            return
        answered = reason == 4
        if answered:
            chans[0].state = 6
            self._event("Newstate", chans[0])
            with self._lock:
                for chan in chans:
                    self._channels[chan.name] = chan
        else:
            cause, text = _REASON_CAUSE.get(reason, (21, "Call Rejected"))
            for chan in chans:
                self._emit_hangup(chan, cause, text)
        if sess is not None:
            if answered:
                sess.send(self._resp(msg, "Success", "Originate successfully queued"))
            else:
                sess.send(self._resp(msg, "Error", "Originate failed"))
        else:
            num, name = _parse_callerid(msg.get("CallerID") or "")
            event = [("Event", "OriginateResponse"), ("Privilege", "call,all")]
            if msg.action_id is not None:
                event.append(("ActionID", msg.action_id))
            event += [("Response", "Success" if answered else "Failure"),
                      ("Channel", chans[0].name if answered else msg.get("Channel") or "")]
            if msg.get("Application"):
                event += [("Application", msg.get("Application") or ""),
                          ("Data", msg.get("Data") or "")]
            else:
                event += [("Context", msg.get("Context") or ""), ("Exten", msg.get("Exten") or "")]
            uniqueid = chans[0].uniqueid if answered else (msg.get("ChannelId") or "<unknown>")
            event += [("Reason", str(reason)), ("Uniqueid", uniqueid),
                      ("CallerIDNum", num), ("CallerIDName", name)]
            self._broadcast(event)
        if answered:
            self._spawn(self._talk, "fake-ami-answer", chans, outcome.on_answer)

    def _talk(self, chans: List[_Channel], on_answer: Optional[Callable[[], None]]) -> None:
        if on_answer is None:
            return   # stays up until a Hangup action or FakeAMI.hangup()
        try:
            on_answer()
        except Exception as exc:
            self._violation(f"on_answer raised {exc!r}")
        if not self._stopping.is_set():
            for chan in reversed(chans):
                self.hangup(chan.name, 16)
