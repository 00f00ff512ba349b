"""A strict fake Asterisk that runs an AGI script as a subprocess and plays the PBX side.

It answers the way Asterisk 22.10.1 did in captured lab transcripts and records every
protocol mistake that would break or deadlock a real call: several commands
in one write, a command sent before the previous answer was read, junk on stdout,
``\\r``, over-long lines, a script that does not exit.

Standard library only; POSIX only (pipes, select, signals).
"""
from __future__ import annotations

import os
import re
import select
import signal
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

try:  # FIONREAD tells whether the script left our previous answer unread.
    import fcntl
    import termios
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]
    termios = None  # type: ignore[assignment]

__all__ = ["AST_ENV", "AGIProtocolError", "AGIRun", "FakeAsterisk", "after_blind_transfer", "after_dial",
           "after_queue", "hangup_args", "parse_args"]

AST_VERSION = "22.10.1"
AGI_BUF_LEN = 8192            # res_agi.c reads with fgets(buf, AGI_BUF_LEN, ...)
MAX_LINE = AGI_BUF_LEN - 1    # so one command is at most 8191 bytes
MAX_ARGS = 128                # parse_args keeps at most MAX_ARGS - 1 words
GET_VARIABLE_MAX = 1023       # GET VARIABLE copies into a 1024-byte buffer
THREAD_ID = "140427056031424"

# Process environment Asterisk adds for the script (Debian package layout under /usr).
AST_ENV: Dict[str, str] = {
    "AST_CONFIG_DIR": "/etc/asterisk",
    "AST_CONFIG_FILE": "/etc/asterisk/asterisk.conf",
    "AST_MODULE_DIR": "/usr/lib/asterisk/modules",
    "AST_SPOOL_DIR": "/var/spool/asterisk",
    "AST_MONITOR_DIR": "/var/spool/asterisk/monitor",
    "AST_VAR_DIR": "/var/lib/asterisk",
    "AST_DATA_DIR": "/var/lib/asterisk",
    "AST_LOG_DIR": "/var/log/asterisk",
    "AST_AGI_DIR": "/var/lib/asterisk/agi-bin",
    "AST_KEY_DIR": "/var/lib/asterisk/keys",
    "AST_RUN_DIR": "/var/run/asterisk",
    "AST_SYSTEMNAME": "",
    "AST_VERSION": AST_VERSION,
    "AST_BUILD_HOST": "vm",
    "AST_BUILD_DATE": "2026-11-21 07:30:41 UTC",
    "AST_BUILD_KERNEL": "6.1.0-27-amd64",
    "AST_BUILD_MACHINE": "x86_64",
    "AST_BUILD_OS": "Linux",
    "AST_BUILD_USER": "root",
}

R510 = "510 Invalid or unknown command\n"
R511 = "511 Command Not Permitted on a dead channel or intercept routine\n"

# Usage texts seen in the transcripts; the rest use the 'agi show commands' summary.
_USAGE = {
    "set variable": "Sets a variable to the current channel.",
    "get variable": (
        "Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set. "
        "Returns <literal>1</literal> if <replaceable>variablename</replaceable> is set and "
        "returns the variable in parentheses.\n"
        "Example return code: 200 result=1 (testvariable)"),
    "get full variable": (
        "Evaluates the given <replaceable>expression</replaceable> against the channel specified by "
        "<replaceable>channelname</replaceable>, or the current channel if "
        "<replaceable>channelname</replaceable> is not provided.\n"
        "Unlike GET VARIABLE, the <replaceable>expression</replaceable> is processed in a manner "
        "similar to dialplan evaluation, allowing complex and built-in variables to be accessed, "
        "e.g. <literal>The time is ${EPOCH}</literal>\n"
        "Returns <literal>0</literal> if no channel matching <replaceable>channelname</replaceable> "
        "exists, <literal>1</literal> otherwise.\n"
        "Example return code: 200 result=1 (The time is 1578493800)"),
    "exec": (
        "Executes <replaceable>application</replaceable> with given <replaceable>options</replaceable>.\n"
        "Returns whatever the <replaceable>application</replaceable> returns, or <literal>-2</literal> "
        "on failure to find <replaceable>application</replaceable>.\n"
        "<note>NOTE:</note> exec does not evaluate dialplan functions and variables unless it is "
        "explicitly enabled by setting the <variable>AGIEXECFULL</variable> variable to "
        "<literal>yes</literal>."),
}


class AGIProtocolError(AssertionError):
    """Raised by FakeAsterisk.run() in strict mode; ``.run`` holds the full AGIRun."""

    def __init__(self, message: str, run: "AGIRun") -> None:
        super().__init__(message)
        self.run = run


@dataclass
class AGIRun:
    returncode: int
    commands: List[str]
    exchanges: List[Tuple[str, str]]
    variables: Dict[str, str]
    set_variables: Dict[str, str]
    stdout_raw: bytes
    stderr: str
    duration: float
    sighup_sent: bool
    agistatus: str
    violations: List[str]

    def executed_apps(self) -> List[Tuple[str, str]]:
        """(app, options) for each answered EXEC, options as Asterisk parsed them."""
        out = []
        for cmd, _resp in self.exchanges:
            argv = parse_args(cmd)
            if len(argv) >= 2 and argv[0].lower() == "exec":
                out.append((argv[1], argv[2] if len(argv) > 2 else ""))
        return out

    def transcript(self) -> str:
        """Readable '>> command' / '<< answer' log, e.g. for the demo command."""
        lines = []
        for cmd, resp in self.exchanges:
            lines.append(">> " + cmd)
            lines.extend("<< " + r for r in resp.splitlines())
        return "\n".join(lines)


# ----------------------------------------------------------------------------- tokenizer

def _parse(line: str) -> Tuple[List[str], bool]:
    """res_agi.c parse_args(); returns (words, truncated)."""
    words: List[List[str]] = []
    quoted = escaped = False
    whitespace = True
    truncated = False
    for ch in line:
        if ch == '"' and not escaped:
            quoted = not quoted
            if quoted and whitespace:
                # Asterisk does not bound-check here (overflow); we drop instead.
                if len(words) >= MAX_ARGS - 1:
                    truncated = True
                    continue
                words.append([])
                whitespace = False
            continue
        if ch in " \t" and not quoted and not escaped:
            whitespace = True
            continue
        if ch == "\\" and not escaped:
            escaped = True
            continue
        if whitespace:
            if len(words) >= MAX_ARGS - 1:
                truncated = True  # "Too many arguments, truncating": char dropped
                continue
            words.append([])
            whitespace = False
        words[-1].append(ch)
        escaped = False
    return ["".join(w) for w in words], truncated


def parse_args(line: str) -> List[str]:
    """Split an AGI command line exactly like Asterisk's parse_args()."""
    return _parse(line)[0]


_INT_RE = re.compile(r"\s*[+-]?\d+")


def _scan_int(text: str) -> Optional[int]:
    """sscanf("%d") semantics: leading integer, trailing junk ignored."""
    m = _INT_RE.match(text)
    return int(m.group()) if m else None


def _norm_func(name: str) -> str:
    func, _, rest = name.partition("(")
    return func.upper() + "(" + rest


def _substring(value: str, spec: str) -> str:
    """${VAR:offset:length} as in pbx_variables.c substring()."""
    parts = spec.split(":")
    try:
        offset = int(parts[0] or 0)
        length = int(parts[1]) if len(parts) > 1 and parts[1] != "" else None
    except ValueError:
        return value
    if offset < 0:
        offset = max(0, len(value) + offset)
    rest = value[offset:]
    if length is None:
        return rest
    if length >= 0:
        return rest[:length]
    return rest[:length] if -length < len(rest) else ""


# ----------------------------------------------------------------------------- what a call leaves

def _duration_vars(base: str, seconds: float) -> Dict[str, str]:
    """set_duration_var() of apps/app_dial.c and apps/app_queue.c: whole seconds (truncated) and ms."""
    ms = int(seconds * 1000)
    return {base: str(ms // 1000), base + "_MS": str(ms)}


def after_dial(answered: bool, talked: float = 0.0, status: str = "NOANSWER") -> Dict[str, str]:
    """The caller's channel after Dial() (apps/app_dial.c).

    Dial clears DIALSTATUS and ANSWEREDTIME when it starts. The callee's U() gosub runs before
    the bridge; the caller's channel is answered at the bridge, and when the bridge ends
    end_bridge_callback sets ANSWEREDTIME to the caller's up time: the talk. Unanswered: DIALSTATUS
    says why and ANSWEREDTIME stays empty.
    """
    if not answered:
        return {"DIALSTATUS": status, "ANSWEREDTIME": "", "ANSWEREDTIME_MS": ""}
    return {"DIALSTATUS": "ANSWER", **_duration_vars("ANSWEREDTIME", talked)}


# QUEUESTATUS values set when the queue itself ends the wait (apps/app_queue.c queue_results[]).
QUEUE_EXITS = ("TIMEOUT", "FULL", "JOINEMPTY", "LEAVEEMPTY", "JOINUNAVAIL", "LEAVEUNAVAIL", "CONTINUE", "WITHDRAW")


def after_queue(outcome: str, talked: float = 0.0) -> Dict[str, str]:
    """The caller's channel after Queue() (apps/app_queue.c); `outcome` = answered | abandoned | a QUEUE_EXITS value.

    Queue never sets DIALSTATUS. QUEUESTATUS is set only when the queue ended the wait (reason
    other than QUEUE_UNKNOWN): it stays unset when the caller hung up or an agent took the call.
    record_abandoned() sets ABANDONED=TRUE for every exit without an agent (the caller hanging up,
    TIMEOUT, LEAVEEMPTY, WITHDRAW). ANSWEREDTIME is the time connected to the agent, 0 when
    there was none. A caller who cannot join (JOINEMPTY, JOINUNAVAIL, FULL) gets QUEUESTATUS only:
    queue_exec() returns before it sets anything else.
    """
    if outcome == "answered":
        return _duration_vars("ANSWEREDTIME", talked)
    if outcome == "abandoned":
        return {"ABANDONED": "TRUE", **_duration_vars("ANSWEREDTIME", 0)}
    if outcome not in QUEUE_EXITS:
        raise ValueError(f"unknown queue outcome {outcome!r}")
    if outcome in ("JOINEMPTY", "JOINUNAVAIL", "FULL"):
        return {"QUEUESTATUS": outcome}
    return {"QUEUESTATUS": outcome, "ABANDONED": "TRUE", **_duration_vars("ANSWEREDTIME", 0)}


def after_blind_transfer(transferer: str, talked: float) -> Dict[str, str]:
    """The transferee's channel as it enters the transfer context (main/bridge.c, two-party bridge).

    ast_bridge_transfer_blind() queues an async goto to exten@TRANSFER_CONTEXT on the transferee
    and sets BLINDTRANSFER to the transferer's name; leaving the bridge ends the Dial that
    connected the two, whose end_bridge_callback has set ANSWEREDTIME: the first part's talk.
    """
    return {**after_dial(True, talked), "BLINDTRANSFER": transferer}


def hangup_args(variables: Dict[str, str], recording: str = "") -> List[str]:
    """The `hangup` step as the sample's [bitrix-hangup] calls it:
    AGI(agi-bitrix,hangup,${DIALSTATUS},${ANSWEREDTIME},${MIXMONITOR_FILENAME}); unset is empty."""
    return ["hangup", variables.get("DIALSTATUS", ""), variables.get("ANSWEREDTIME", ""), recording]


# ----------------------------------------------------------------------------- built-in apps

AppHandler = Callable[["FakeAsterisk", str], int]


def _app_zero(fa: "FakeAsterisk", options: str) -> int:
    return 0


def _app_set(fa: "FakeAsterisk", options: str) -> int:
    name, sep, value = options.partition("=")
    if sep and name:  # Set without '=' only logs a warning and returns 0
        fa._setvar(name, value)
    return 0


def _app_wait(fa: "FakeAsterisk", options: str) -> int:
    try:
        seconds = float(options or 0)
    except ValueError:
        seconds = 0.0
    return 0 if fa.sleep(seconds) else -1


def _app_dial(fa: "FakeAsterisk", options: str) -> int:
    if fa.dead:  # LAB: Dial on a hung-up channel -> -1, DIALSTATUS=CANCEL
        fa.variables["DIALSTATUS"] = "CANCEL"
        return -1
    fa.variables.update(after_dial(True))
    return 0


_BUILTIN_APPS: Dict[str, AppHandler] = {
    "verbose": _app_zero, "noop": _app_zero, "log": _app_zero,
    "set": _app_set, "wait": _app_wait, "dial": _app_dial,
}


# ----------------------------------------------------------------------------- the fake

class FakeAsterisk:
    """Runs ``script + args`` like Asterisk's AGI() and serves its commands."""

    def __init__(self, script: Sequence[str], args: Sequence[str] = (), *,
                 channel: str = "PJSIP/100-00000001", callerid: str = "unknown",
                 calleridname: str = "unknown", dnid: str = "unknown", context: str = "default",
                 extension: str = "s", priority: str = "1", uniqueid: str = "1795247072.0",
                 linkedid: Optional[str] = None,
                 variables: Optional[Dict[str, str]] = None,
                 agi_env: Optional[Dict[str, str]] = None,
                 env: Optional[Dict[str, str]] = None,
                 dead: bool = False,
                 hangup_after: Optional[float] = None,
                 hangup_on: Optional[Callable[[str], bool]] = None,
                 apps: Optional[Dict[str, AppHandler]] = None,
                 timeout: float = 15.0,
                 strict: bool = True) -> None:
        self.script = list(script)
        self.args = list(args)
        self.channel = channel
        self.callerid = callerid
        self.calleridname = calleridname
        self.dnid = dnid
        self.context = context
        self.extension = extension
        self.priority = priority
        self.uniqueid = uniqueid
        self.linkedid = uniqueid if linkedid is None else linkedid
        self.variables: Dict[str, str] = dict(variables or {})
        self.agi_env = dict(agi_env or {})
        self.env = dict(env or {})
        self.start_dead = dead
        self.hangup_after = hangup_after
        self.hangup_on = hangup_on
        self.apps = {k.lower(): v for k, v in (apps or {}).items()}
        self.timeout = timeout
        self.strict = strict
        self.database: Dict[Tuple[str, str], str] = {}  # AstDB, kept across runs
        self._reset()

    # --- public helpers for tests and app handlers --------------------------------------

    @property
    def dead(self) -> bool:
        """True once the channel is hung up (or from the start with dead=True)."""
        return self._dead

    def hangup(self) -> None:
        """The caller hangs up now: channel goes dead, SIGHUP once (as Asterisk)."""
        if self._dead:
            return
        self._dead = True
        self._hangup_at = self._autohangup_at = None
        if self._returnstatus == "SUCCESS":
            self._returnstatus = "HANGUP"
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGHUP)
            self._sighup_sent = True

    def sleep(self, seconds: float) -> bool:
        """Sleep inside an app handler; False if the channel hung up meanwhile."""
        end = min(time.monotonic() + max(0.0, seconds), self._deadline)
        while True:
            now = time.monotonic()
            due = self._due()
            if due is not None and now >= due:
                self.hangup()
                return False
            if now >= end:
                return True
            time.sleep(max(0.0, min(end, due if due is not None else end) - now))

    def env_block(self) -> bytes:
        """The environment block exactly as written to the script's stdin."""
        tech = self.channel.split("/", 1)[0] if "/" in self.channel else "NULL"
        # Asterisk reports "number not available" (67) when no caller ID is known.
        pres = "67" if self.callerid == "unknown" and self.calleridname == "unknown" else "0"
        pairs = [
            ("agi_request", self._request_name()), ("agi_channel", self.channel),
            ("agi_language", "en"), ("agi_type", tech), ("agi_uniqueid", self.uniqueid),
            ("agi_version", AST_VERSION), ("agi_callerid", self.callerid),
            ("agi_calleridname", self.calleridname), ("agi_callingpres", pres),
            ("agi_callingani2", "0"), ("agi_callington", "0"), ("agi_callingtns", "0"),
            ("agi_dnid", self.dnid), ("agi_rdnis", "unknown"), ("agi_context", self.context),
            ("agi_extension", self.extension), ("agi_priority", self.priority),
            ("agi_enhanced", "0.0"), ("agi_accountcode", ""), ("agi_threadid", THREAD_ID),
        ] + [("agi_arg_%d" % i, a) for i, a in enumerate(self.args, 1)]
        extra = dict(self.agi_env)
        out = [(k, extra.pop(k)) for k in ("agi_network", "agi_network_script") if k in extra]
        out += [(k, extra.pop(k, v)) for k, v in pairs]
        out += list(extra.items())
        # Raw values, no escaping: a newline in a value breaks the block, as in Asterisk.
        return ("".join("%s: %s\n" % kv for kv in out) + "\n").encode("utf-8", "surrogateescape")

    # --- running -------------------------------------------------------------------------

    def run(self, stdin_extra: bytes = b"") -> AGIRun:
        self._reset()
        start = time.monotonic()
        self._deadline = start + self.timeout
        if self.hangup_after is not None and not self._dead:
            self._hangup_at = start + self.hangup_after
        proc = subprocess.Popen(
            self.script + self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={**os.environ, **AST_ENV, **self.env},
            close_fds=True, preexec_fn=_child_setup)
        self._proc = proc
        err_sink = bytearray()
        err_thread = threading.Thread(target=_drain, args=(proc.stderr.fileno(), err_sink), daemon=True)
        err_thread.start()
        self._in_fd = proc.stdin.fileno()
        os.set_blocking(self._in_fd, False)
        self._fionread = not stdin_extra and self._unread_stdin() is not None
        end = start
        try:
            self._send(self.env_block() + stdin_extra)
            stop = self._serve(proc.stdout.fileno())
            if stop == "failure":
                # After a 'failure' line Asterisk signals the process and closes the pipes.
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGHUP)
                    self._sighup_sent = True
                self._close_pipes(proc)
            if stop != "timeout":
                try:  # EOF: Asterisk waitpid()s, blocking the channel, until the exit
                    proc.wait(timeout=max(0.0, self._deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._kill_for_timeout()
            end = time.monotonic()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self._close_pipes(proc)
            err_thread.join(timeout=1.0)
            if not err_thread.is_alive():  # a grandchild may still hold stderr open
                proc.stderr.close()
            self._proc = None
        returncode = proc.returncode
        status = self._returnstatus
        if status == "SUCCESS" and returncode != 0:
            status = "FAILURE"
        variables = dict(self.variables)
        variables["AGISTATUS"] = status
        result = AGIRun(
            returncode=returncode, commands=list(self._commands), exchanges=list(self._exchanges),
            variables=variables, set_variables=dict(self._set_vars), stdout_raw=bytes(self._stdout),
            stderr=bytes(err_sink).decode("utf-8", "replace"), duration=end - start,
            sighup_sent=self._sighup_sent, agistatus=status, violations=list(self._violations))
        if self.strict and result.violations:
            raise AGIProtocolError(
                "AGI protocol violations:\n" + "\n".join(" - " + v for v in result.violations), result)
        return result

    # --- internals: state ----------------------------------------------------------------

    def _reset(self) -> None:
        self._dead = self.start_dead
        self._hangup_at: Optional[float] = None
        self._autohangup_at: Optional[float] = None
        self._returnstatus = "SUCCESS"
        self._sighup_sent = False
        self._proc: Optional[subprocess.Popen] = None
        self._in_fd: Optional[int] = None
        self._out_fd: Optional[int] = None
        self._deadline = time.monotonic() + self.timeout
        self._buf = bytearray()
        self._eof = False
        self._stdout = bytearray()
        self._commands: List[str] = []
        self._exchanges: List[Tuple[str, str]] = []
        self._set_vars: Dict[str, str] = {}
        self._violations: List[str] = []
        self._last_cmd: Optional[str] = None
        self._fionread = False
        self._hangup_after_answer = False

    def _violation(self, text: str) -> None:
        self._violations.append(text)

    def _due(self) -> Optional[float]:
        times = [t for t in (self._hangup_at, self._autohangup_at) if t is not None]
        return min(times) if times else None

    def _check_timers(self) -> None:
        due = self._due()
        if due is not None and time.monotonic() >= due:
            self.hangup()

    def _request_name(self) -> str:
        last = self.script[-1] if self.script else ""
        if "/" in last or os.path.isfile(last):
            return os.path.basename(last)
        return "agi-bitrix"

    def _kill_for_timeout(self) -> None:
        self._violation("script held the channel for %g s: killed (Asterisk would wait forever)"
                        % self.timeout)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def _close_pipes(self, proc: subprocess.Popen) -> None:
        self._in_fd = None
        for pipe in (proc.stdin, proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass

    # --- internals: I/O ------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self._in_fd is not None:
            try:
                view = view[os.write(self._in_fd, view):]
            except BlockingIOError:  # script is not reading; wait, but not past the deadline
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    return
                select.select([], [self._in_fd], [], min(remaining, 0.1))
            except OSError:  # script gone (EPIPE): Asterisk ignores it too
                return

    def _unread_stdin(self) -> Optional[int]:
        if fcntl is None or self._in_fd is None:
            return None
        try:
            return struct.unpack("i", fcntl.ioctl(self._in_fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return None

    def _fill(self, wait: float) -> None:
        """One select + os.read on the raw fd, like Asterisk's poll() on it."""
        if self._eof or self._out_fd is None:
            return
        ready, _, _ = select.select([self._out_fd], [], [], max(0.0, wait))
        if ready:
            data = os.read(self._out_fd, 65536)
            if data:
                self._buf += data
                self._stdout += data
            else:
                self._eof = True

    def _next_line(self) -> Optional[Tuple[bytes, bool]]:
        """What fgets(buf, 8192) would return next; (bytes, is_split_head)."""
        buf = self._buf
        idx = buf.find(b"\n", 0, MAX_LINE)
        if idx >= 0:
            line = bytes(buf[:idx + 1])
            del buf[:idx + 1]
            return line, False
        if len(buf) >= MAX_LINE:
            line = bytes(buf[:MAX_LINE])
            del buf[:MAX_LINE]
            self._violation("line longer than %d bytes: Asterisk splits it and runs the rest as "
                            "another command: %r..." % (MAX_LINE, line[:60]))
            return line, True
        if self._eof and buf:
            line = bytes(buf)
            buf.clear()
            self._violation("last command has no newline: %r" % line[:200])
            return line, False
        return None

    def _serve(self, out_fd: int) -> str:
        """Serve commands until EOF; returns 'eof', 'failure' or 'timeout'."""
        self._out_fd = out_fd
        while True:
            item = self._next_line()
            if item is None:
                if self._eof:
                    return "eof"
                now = time.monotonic()
                if now >= self._deadline:
                    self._kill_for_timeout()
                    return "timeout"
                self._check_timers()
                due = self._due()
                wake = self._deadline if due is None else min(due, self._deadline)
                self._fill(wake - now)
                continue
            stop = self._serve_line(*item)
            if stop:
                return stop

    def _serve_line(self, raw: bytes, split_head: bool) -> Optional[str]:
        if raw[:1] == b"\0":
            self._violation("line starts with a NUL byte: Asterisk takes it as the end of the script")
            return "eof"
        if raw[:7].lower() == b"failure":
            self._commands.append(raw.rstrip(b"\n").decode("utf-8", "surrogateescape"))
            self._violation("line starting with 'failure': Asterisk ends the AGI with FAILURE")
            self._returnstatus = "FAILURE"
            return "failure"
        text = raw.split(b"\0", 1)[0]  # C string: everything after a NUL is lost
        if len(text) != len(raw):
            self._violation("NUL byte in command: %r" % raw[:200])
        if text.endswith(b"\n"):
            text = text[:-1]
        cmd = text.decode("utf-8", "surrogateescape")
        self._commands.append(cmd)
        self._check_pipelining(cmd, split_head)
        if "\r" in cmd:
            self._violation("carriage return in command (Asterisk keeps it): %r" % cmd)
        if not cmd.strip(" \t"):
            self._violation("blank line on stdout (not a command)")
        self._check_timers()
        if self.hangup_on is not None and not self._dead and self.hangup_on(cmd):
            self.hangup()
        response = self._dispatch(cmd)
        self._exchanges.append((cmd, response))
        self._last_cmd = cmd
        self._send(response.encode("utf-8", "surrogateescape"))
        if self._hangup_after_answer:  # HANGUP command: SIGHUP follows the answer
            self._hangup_after_answer = False
            self.hangup()
        return None

    def _check_pipelining(self, cmd: str, split_head: bool) -> None:
        # Asterisk fgets() from a stdio buffer but waits with poll() on the fd: a second
        # line that arrived with the first sits unseen in the buffer -> deadlock.
        if self._fionread and (self._unread_stdin() or 0) > 0:
            if self._last_cmd is None:
                self._violation("command written before the environment block was read: %r" % cmd)
            else:
                self._violation("second command written before the answer to %r was read: %r"
                                % (self._last_cmd, cmd))
            return
        if split_head:
            return
        if not self._buf:
            self._fill(0.005)
        if self._buf:
            self._violation("second command written before the answer to %r: %r already sent"
                            % (cmd, bytes(self._buf[:80])))

    # --- internals: channel data ---------------------------------------------------------

    def _builtin(self, name: str) -> Optional[str]:
        fixed = {"UNIQUEID": self.uniqueid, "CHANNEL": self.channel, "CONTEXT": self.context,
                 "EXTEN": self.extension, "PRIORITY": self.priority}
        if name in fixed:
            return fixed[name]
        if name.endswith(")") and _norm_func(name).startswith("CHANNEL("):
            item = name[name.index("(") + 1:-1].lower()
            return {"linkedid": self.linkedid, "uniqueid": self.uniqueid, "name": self.channel,
                    "language": "en",
                    "channeltype": self.channel.split("/", 1)[0] if "/" in self.channel else "NULL",
                    }.get(item)
        return None

    def _get(self, name: str) -> Optional[str]:
        """Variable or function value as the channel has it; None when unset."""
        value = self._builtin(name)
        if value is not None:
            return value
        if name in self.variables:
            return self.variables[name]
        if name.endswith(")"):  # function names are case-insensitive
            key = _norm_func(name)
            for k, v in self.variables.items():
                if k.endswith(")") and _norm_func(k) == key:
                    return v
            if key == "CHANNEL(state)":
                return "Up"
            if key == "CALLERID(num)":
                return "" if self.callerid == "unknown" else self.callerid
            if key == "CALLERID(name)":
                return "" if self.calleridname == "unknown" else self.calleridname
            if key == "CALLERID(all)":
                return '"%s" <%s>' % (self._get("CALLERID(name)"), self._get("CALLERID(num)"))
            return None
        if name == "HANGUPCAUSE":
            return "16" if self._dead else "0"
        if name == "EPOCH":
            return str(int(time.time()))
        return None

    def _setvar(self, name: str, value: str) -> None:
        # pbx_builtin_setvar_helper: '_'/'__' inheritance prefixes are not part of the name.
        if not name.endswith(")"):
            name = name[1:] if name.startswith("_") else name
            name = name[1:] if name.startswith("_") else name
        self.variables[name] = value

    def _expand(self, text: str) -> str:
        """${NAME}, ${FUNC(args)}, nesting and ${X:off:len}; $[...] is left as is."""
        out: List[str] = []
        i = 0
        while i < len(text):
            if not text.startswith("${", i):
                out.append(text[i])
                i += 1
                continue
            depth, j = 1, i + 2
            while j < len(text) and depth:
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                j += 1
            if depth:  # unterminated: Asterisk copies it literally
                out.append(text[i:])
                break
            inner = self._expand(text[i + 2:j - 1])
            name, spec = inner, None
            level = 0
            for k, ch in enumerate(inner):
                level += ch == "("
                level -= ch == ")"
                if ch == ":" and level == 0:
                    name, spec = inner[:k], inner[k + 1:]
                    break
            value = self._get(name) or ""
            out.append(_substring(value, spec) if spec is not None else value)
            i = j
        return "".join(out)

    # --- internals: commands -------------------------------------------------------------

    def _dispatch(self, cmd: str) -> str:
        argv, truncated = _parse(cmd)
        if truncated:
            self._violation("more than %d words, Asterisk truncates: %r" % (MAX_ARGS - 1, cmd[:200]))
        for words, dead_ok, handler in _COMMANDS:
            n = len(words)
            if len(argv) >= n and all(argv[i].lower() == words[i] for i in range(n)):
                if self._dead and not dead_ok:
                    return R511
                return handler(self, argv)
        if cmd.strip(" \t"):
            self._violation("unknown command (510): %r" % cmd[:200])
        return R510

    def _usage(self, argv: List[str], name: str) -> str:
        self._violation("invalid command syntax (520): %r" % " ".join(argv)[:200])
        return ("520-Invalid command syntax.  Proper usage follows:\n%s\n520 End of proper usage.\n"
                % _USAGE.get(name, _SUMMARY.get(name, name)))

    def _cmd_answer(self, argv: List[str]) -> str:
        return "200 result=0\n"

    def _cmd_hangup(self, argv: List[str]) -> str:
        if len(argv) > 2:
            return self._usage(argv, "hangup")
        if len(argv) == 2 and argv[1] != self.channel:
            return "200 result=-1\n"
        self._hangup_after_answer = True
        return "200 result=1\n"

    def _cmd_channel_status(self, argv: List[str]) -> str:
        if len(argv) > 3:
            return self._usage(argv, "channel status")
        if len(argv) == 3 and argv[2] != self.channel:
            return "200 result=-1\n"
        return "200 result=6\n"

    def _cmd_get_variable(self, argv: List[str]) -> str:
        if len(argv) != 3:
            return self._usage(argv, "get variable")
        value = self._get(argv[2])
        if value is None:
            return "200 result=0\n"
        raw = value.encode("utf-8", "surrogateescape")[:GET_VARIABLE_MAX]
        return "200 result=1 (%s)\n" % raw.decode("utf-8", "surrogateescape")

    def _cmd_get_full_variable(self, argv: List[str]) -> str:
        if len(argv) not in (4, 5):
            return self._usage(argv, "get full variable")
        if len(argv) == 5 and argv[4] != self.channel:
            return "200 result=0\n"
        return "200 result=1 (%s)\n" % self._expand(argv[3])

    def _cmd_set_variable(self, argv: List[str]) -> str:
        if len(argv) != 4:
            return self._usage(argv, "set variable")
        self._setvar(argv[2], argv[3])
        self._set_vars[argv[2]] = argv[3]
        return "200 result=1\n"

    def _cmd_verbose(self, argv: List[str]) -> str:
        if len(argv) < 2:
            return self._usage(argv, "verbose")
        return "200 result=1\n"

    def _cmd_noop(self, argv: List[str]) -> str:
        return "200 result=0\n"

    def _cmd_exec(self, argv: List[str]) -> str:
        if len(argv) < 2:
            return self._usage(argv, "exec")
        if len(argv) > 3:
            self._violation("EXEC passes only one option word, the rest is ignored: %r"
                            % " ".join(argv)[:200])
        options = argv[2] if len(argv) > 2 else ""
        if self.variables.get("AGIEXECFULL", "").lower() in ("yes", "true", "on", "1", "y", "t"):
            options = self._expand(options)
        handler = self.apps.get(argv[1].lower()) or _BUILTIN_APPS.get(argv[1].lower())
        if handler is None:
            return "200 result=-2\n"
        was_dead = self._dead
        result = int(handler(self, options))
        self._check_timers()
        if self._dead and not was_dead:  # caller hung up while the app ran
            result = -1
        return "200 result=%d\n" % result

    def _cmd_database(self, argv: List[str]) -> str:
        op = argv[1].lower()
        need = {"get": (4,), "put": (5,), "del": (4,), "deltree": (3, 4)}[op]
        if len(argv) not in need:
            return self._usage(argv, "database " + op)
        if op == "get":
            value = self.database.get((argv[2], argv[3]))
            return "200 result=0\n" if value is None else "200 result=1 (%s)\n" % value
        if op == "put":
            self.database[(argv[2], argv[3])] = argv[4]
            return "200 result=1\n"
        if op == "del":
            return "200 result=%d\n" % (self.database.pop((argv[2], argv[3]), None) is not None)
        prefix = argv[3] if len(argv) == 4 else None
        doomed = [k for k in self.database
                  if k[0] == argv[2] and (prefix is None or k[1] == prefix or k[1].startswith(prefix + "/"))]
        for k in doomed:
            del self.database[k]
        return "200 result=%d\n" % bool(doomed)

    def _cmd_gosub(self, argv: List[str]) -> str:
        if not 4 <= len(argv) <= 5:
            return self._usage(argv, "gosub")
        return "100 result=0 Trying...\n200 result=0 Gosub complete\n"

    def _cmd_wait_for_digit(self, argv: List[str]) -> str:
        if len(argv) != 4 or _scan_int(argv[3]) is None:
            return self._usage(argv, "wait for digit")
        ms = _scan_int(argv[3]) or 0
        seconds = ms / 1000.0 if ms >= 0 else self._deadline - time.monotonic()
        return "200 result=0\n" if self.sleep(seconds) else "200 result=-1\n"

    def _cmd_set_one(self, argv: List[str]) -> str:
        """SET CALLERID / CONTEXT / EXTENSION / PRIORITY / AUTOHANGUP / MUSIC."""
        what = argv[1].lower()
        if len(argv) != 3 and not (what == "music" and len(argv) == 4):
            return self._usage(argv, "set " + what)
        value = argv[2]
        if what == "callerid":
            m = re.match(r'\s*(?:"([^"]*)"|([^<]*?))\s*<([^>]*)>', value)
            name, num = ((m.group(1) or m.group(2) or ""), m.group(3)) if m else ("", value)
            self.variables["CALLERID(name)"] = name
            self.variables["CALLERID(num)"] = re.sub(r"[()\-. ]", "", num)
            return "200 result=1\n"
        if what == "context":
            self.context = value
        elif what == "extension":
            self.extension = value
        elif what == "priority":
            if _scan_int(value) is None:  # labels would need a dialplan
                return self._usage(argv, "set priority")
            self.priority = str(_scan_int(value))
        elif what == "autohangup":
            secs = _scan_int(value)
            if secs is None:
                return self._usage(argv, "set autohangup")
            self._autohangup_at = time.monotonic() + secs if secs > 0 else None
        return "200 result=0\n"

    def _cmd_not_simulated(self, argv: List[str]) -> str:
        # Media/speech commands: answered like the lab box without sound files.
        self._violation("command not simulated by FakeAsterisk: %r" % " ".join(argv)[:200])
        return "200 result=-1 endpos=0\n" if "stream" in " ".join(argv[:3]).lower() else "200 result=-1\n"


# 'agi show commands' (Asterisk 22): words, usable on a dead channel, summary.
_TABLE = [
    ("answer", False, "Answer channel"),
    ("asyncagi break", True, "Interrupts Async AGI"),
    ("channel status", False, "Returns status of the connected channel."),
    ("database del", True, "Removes database key/value"),
    ("database deltree", True, "Removes database keytree/value"),
    ("database get", True, "Gets database value"),
    ("database put", True, "Adds/updates database value"),
    ("exec", True, "Executes a given Application"),
    ("get data", False, "Prompts for DTMF on a channel"),
    ("get full variable", True, "Evaluates a channel expression"),
    ("get option", False, "Stream file, prompt for DTMF, with timeout."),
    ("get variable", True, "Gets a channel variable."),
    ("hangup", False, "Hangup a channel."),
    ("noop", True, "Does nothing."),
    ("receive char", False, "Receives one character from channels supporting it."),
    ("receive text", False, "Receives text from channels supporting it."),
    ("record file", False, "Records to a given file."),
    ("say alpha", False, "Says a given character string."),
    ("say digits", False, "Says a given digit string."),
    ("say number", False, "Says a given number."),
    ("say phonetic", False, "Says a given character string with phonetics."),
    ("say date", False, "Says a given date."),
    ("say time", False, "Says a given time."),
    ("say datetime", False, "Says a given time as specified by the format given."),
    ("send image", False, "Sends images to channels supporting it."),
    ("send text", False, "Sends text to channels supporting it."),
    ("set autohangup", False, "Autohangup channel in some time."),
    ("set callerid", False, "Sets callerid for the current channel."),
    ("set context", False, "Sets channel context."),
    ("set extension", False, "Changes channel extension."),
    ("set music", False, "Enable/Disable Music on hold generator"),
    ("set priority", False, "Set channel dialplan priority."),
    ("set variable", True, "Sets a channel variable."),
    ("stream file", False, "Sends audio file on channel."),
    ("control stream file", False, "Sends audio file on channel and allows the listener to control the stream."),
    ("tdd mode", False, "Toggles TDD mode (for the deaf)."),
    ("verbose", True, "Logs a message to the asterisk verbose log."),
    ("wait for digit", False, "Waits for a digit to be pressed."),
    ("speech create", False, "Creates a speech object."),
    ("speech set", False, "Sets a speech engine setting."),
    ("speech destroy", True, "Destroys a speech object."),
    ("speech load grammar", False, "Loads a grammar."),
    ("speech unload grammar", True, "Unloads a grammar."),
    ("speech activate grammar", False, "Activates a grammar."),
    ("speech deactivate grammar", False, "Deactivates a grammar."),
    ("speech recognize", False, "Recognizes speech."),
    ("gosub", False, "Cause the channel to execute the specified dialplan subroutine."),
]
_SUMMARY = {name: summary for name, _dead, summary in _TABLE}
_HANDLERS = {
    "answer": FakeAsterisk._cmd_answer, "hangup": FakeAsterisk._cmd_hangup,
    "channel status": FakeAsterisk._cmd_channel_status,
    "get variable": FakeAsterisk._cmd_get_variable,
    "get full variable": FakeAsterisk._cmd_get_full_variable,
    "set variable": FakeAsterisk._cmd_set_variable, "verbose": FakeAsterisk._cmd_verbose,
    "noop": FakeAsterisk._cmd_noop, "exec": FakeAsterisk._cmd_exec,
    "database get": FakeAsterisk._cmd_database, "database put": FakeAsterisk._cmd_database,
    "database del": FakeAsterisk._cmd_database, "database deltree": FakeAsterisk._cmd_database,
    "gosub": FakeAsterisk._cmd_gosub, "wait for digit": FakeAsterisk._cmd_wait_for_digit,
    "set callerid": FakeAsterisk._cmd_set_one, "set context": FakeAsterisk._cmd_set_one,
    "set extension": FakeAsterisk._cmd_set_one, "set priority": FakeAsterisk._cmd_set_one,
    "set autohangup": FakeAsterisk._cmd_set_one, "set music": FakeAsterisk._cmd_set_one,
}
_COMMANDS: List[Tuple[Tuple[str, ...], bool, Callable[[FakeAsterisk, List[str]], str]]] = [
    (tuple(name.split()), dead_ok, _HANDLERS.get(name, FakeAsterisk._cmd_not_simulated))
    for name, dead_ok, _summary in _TABLE
]


def _child_setup() -> None:
    """Like ast_safe_fork(): default signal dispositions, nothing blocked."""
    for name in ("SIGHUP", "SIGINT", "SIGTERM", "SIGCHLD", "SIGURG", "SIGPIPE", "SIGXFSZ"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _drain(fd: int, sink: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        sink += chunk
