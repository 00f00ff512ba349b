"""The AGI session: pyst2 for the protocol, wrapped so its known defects never reach a call.

pyst2 (rdegges/pyst2 asterisk/agi.py) escapes nothing, writes every line it sees to stderr (Asterisk's console),
and after a SIGHUP refuses every later command, even the ones Asterisk still serves on a dead
channel. This wrapper keeps pyst2's command/response handling and replaces the rest:
- the environment block is parsed here (split at the first ':', one space dropped, empty kept);
- every argument is escaped by `quote`, so a value can never start a second command;
- one command is written, then its answer is read, before anything else is written;
- SIGHUP only marks the session hung up: GET/SET VARIABLE, VERBOSE and EXEC still work;
- 511 (dead channel), 510, EOF and a broken pipe become results, never exceptions.
"""
from __future__ import annotations

import io
import os
import re
import sys
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, Optional

from asterisk import agi as pyst

MAX_VALUE_BYTES = 1000  # Asterisk truncates GET VARIABLE at 1023; old releases cap lines at 2047
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\([A-Za-z0-9_,]*\))?")
_RESPONSE = re.compile(r"^\d{3}[ -]")


def quote(value: object) -> str:
    """One AGI argument: no CR/LF/NUL, backslash and quote escaped, wrapped in quotes, bounded."""
    text = str(value)
    text = text.replace("\r", " ").replace("\n", " ").replace("\0", "")
    raw = text.encode("utf-8")
    if len(raw) > MAX_VALUE_BYTES:
        text = raw[:MAX_VALUE_BYTES].decode("utf-8", "ignore")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Null(io.TextIOBase):
    """Where pyst2's chatter goes."""

    def write(self, s: str) -> int:
        return len(s)


class _ResponseReader:
    """stdin for pyst2: skips lines that cannot be AGI responses.

    A caller-ID name with a raw newline can spill lines of the environment block into the
    response stream; such a line is never a response, so it is dropped instead of desyncing.
    Over FastAGI, Asterisk writes a bare `HANGUP` line when the caller hangs up, even where a
    command's answer is expected (Asterisk res/res_agi.c, run_agi): it marks the call hung up.
    """

    def __init__(self, stream: IO[str], on_hangup: Callable[[], None]) -> None:
        self.stream = stream
        self.on_hangup = on_hangup
        self.skipped = 0
        self.unread: Optional[str] = None  # a line given back, read again first

    def readline(self) -> str:
        if self.unread is not None:
            line, self.unread = self.unread, None
            return line
        while True:
            line = self.stream.readline()
            if not line or _RESPONSE.match(line):
                return line
            if line.rstrip("\r\n") == "HANGUP":
                self.on_hangup()
                continue
            self.skipped += 1


class _Pyst(pyst.AGI):
    """pyst2's AGI without its constructor side effects (SIGHUP handler, stderr dump, env read)."""

    def __init__(self, stdin: _ResponseReader, stdout: IO[str]) -> None:  # noqa: D401 - no super()
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = _Null()
        self._got_sighup = False
        self.env: Dict[str, str] = {}

    def test_hangup(self) -> None:
        """Dead-capable commands keep working after SIGHUP (Asterisk res/res_agi.c)."""

    def get_result(self, stdin: Any = None) -> Dict[str, Any]:
        """A `200` answer read as pyst2 reads it, but without the pprint of every result for the
        console this wrapper silences (a tenth of a FastAGI step's CPU). Any other answer (510,
        520 with its usage lines, 511, EOF) goes to pyst2 itself."""
        line = self.stdin.readline()
        if not line.startswith("200 "):
            self.stdin.unread = line
            return super().get_result()
        result: Dict[str, Any] = {"result": ("", "")}
        for key, value, data in pyst.re_kv.findall(line.strip()[3:].lstrip()):
            result[key] = (value, data)
            if data == "hangup":
                raise pyst.AGIResultHangup("User hungup during execution")
            if key == "result" and value == "-1":
                raise pyst.AGIAppError("Error executing application, or hangup")
        return result


@dataclass
class Response:
    code: int
    result: Optional[str] = None
    data: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 200


class EnvError(Exception):
    """The environment block is unusable (too large, or the peer stalled or left in it)."""


class AGISession:
    """One AGI conversation with Asterisk: over stdin/stdout (process mode) or a socket (FastAGI)."""

    def __init__(self, stdin: IO[str], stdout: IO[str], network: bool = False) -> None:
        self._in = stdin
        self._out = stdout
        self._reader = _ResponseReader(stdin, self.on_sighup)
        self._agi = _Pyst(self._reader, stdout)
        self.env: Dict[str, str] = {}
        self.network = network  # FastAGI: the HANGUP line and EOF stand for SIGHUP
        self.handed_back = False  # detach(): closed by us, not by Asterisk
        self._sock: Any = None
        self.dead = False  # a 511 was seen or the caller hung up
        self.closed = False  # Asterisk went away (EOF / broken pipe)
        self.commands = 0

    @classmethod
    def from_stdio(cls) -> "AGISession":
        # Raw byte streams, decoded leniently: a caller name in Latin-1 must not crash the script,
        # and '\r' must stay visible rather than be translated.
        stdin = io.TextIOWrapper(io.FileIO(0, "rb", closefd=False), encoding="utf-8",
                                 errors="replace", newline="\n")
        stdout = io.TextIOWrapper(io.FileIO(1, "wb", closefd=False), encoding="utf-8",
                                  errors="replace", newline="\n", write_through=True)
        session = cls(stdin, stdout)
        session.read_env()
        return session

    @classmethod
    def from_socket(cls, sock: Any, max_env: int, env_timeout: float) -> "AGISession":
        """A FastAGI connection; EnvError when the block is over `max_env` bytes or stalls."""
        import socket

        rfile = sock.makefile("rb")
        wfile = sock.makefile("wb", buffering=0)
        stdin = io.TextIOWrapper(rfile, encoding="utf-8", errors="replace", newline="\n")
        stdout = io.TextIOWrapper(wfile, encoding="utf-8", errors="replace", newline="\n", write_through=True)
        session = cls(stdin, stdout, network=True)
        session._sock = sock
        sock.settimeout(env_timeout)
        try:
            session.read_env(max_env)
        except (socket.timeout, TimeoutError):
            raise EnvError(f"the peer stalled in the environment block (no end within {env_timeout:g} s)") from None
        except OSError as exc:
            raise EnvError(f"the peer left in the environment block ({exc.strerror or exc})") from None
        # Answers come at Asterisk's pace (EXEC Dial blocks for the whole call): no read timeout.
        sock.settimeout(None)
        if session.closed:
            raise EnvError("the peer closed the connection before the end of the environment block")
        return session

    def close(self) -> None:
        """Drop the streams (the socket itself belongs to whoever accepted it)."""
        for stream in (self._in, self._out):
            try:
                stream.close()
            except (OSError, ValueError):
                pass

    # -- environment ------------------------------------------------------------------------
    def read_env(self, max_bytes: Optional[int] = None) -> Dict[str, str]:
        left = max_bytes
        for _ in range(512):  # Asterisk sends ~25 lines; bound junk
            line = self._in.readline(left + 1) if left is not None else self._in.readline()
            if left is not None:
                left -= len(line)
                if left < 0:
                    raise EnvError(f"environment block larger than {max_bytes} bytes")
            if not line:
                self.closed = True
                break
            line = line[:-1] if line.endswith("\n") else line
            if line == "" or (max_bytes is not None and line == "\r"):  # a network peer may speak CRLF
                break
            key, sep, value = line.partition(":")
            if not sep or not key.startswith("agi_"):
                continue
            self.env[key.strip()] = value[1:] if value.startswith(" ") else value
        else:
            if max_bytes is not None:  # a network peer gets no benefit of the doubt
                raise EnvError("environment block of more than 512 lines")
        self._agi.env = self.env
        return self.env

    def arg(self, index: int) -> str:
        return self.env.get(f"agi_arg_{index}", "")

    # -- commands ---------------------------------------------------------------------------
    @property
    def hung_up(self) -> bool:
        # Over FastAGI a closed connection is the caller gone as well (no SIGHUP exists there).
        return self._agi._got_sighup or (self.network and self.closed and not self.handed_back)

    def on_sighup(self, *_: object) -> None:
        self._agi._got_sighup = True
        self.dead = True

    def detach(self) -> None:
        """The step gave Asterisk its answer and goes on without it: in process mode its stdio went
        to /dev/null; over FastAGI the connection is closed now, which lets the channel go on."""
        self.handed_back = True
        self.closed = True
        if self._sock is not None:
            import socket

            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def command(self, name: str, *args: str) -> Response:
        """Send one command (args already quoted) and read its answer."""
        if self.closed:
            return Response(0)
        self.commands += 1
        try:
            result = self._agi.execute(name, *args)
        except pyst.AGISIGPIPEHangup:
            self.closed = True
            return Response(0)
        except pyst.AGIAppError:  # 200 result=-1: the app failed or the caller hung up
            return Response(200, "-1")
        except pyst.AGIUnknownError as exc:
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
            if code == 511:
                self.dead = True
            return Response(code)
        except pyst.AGIInvalidCommand:
            return Response(510)
        except pyst.AGIUsageError:
            return Response(520)
        except (ValueError, OSError, pyst.AGIException):
            # EOF (pyst2 fails on int('')) or a broken pipe: Asterisk is gone.
            self.closed = True
            return Response(0)
        value, data = result.get("result", ("", ""))
        return Response(200, value, data or "")

    def get_variable(self, name: str) -> Optional[str]:
        """A channel variable or function; None when unset."""
        if not _VAR_NAME.fullmatch(name):
            raise ValueError(f"bad variable name {name!r}")
        resp = self.command("GET VARIABLE", name)
        if not resp.ok or resp.result != "1":
            return None
        return resp.data

    def set_variable(self, name: str, value: object) -> bool:
        if not _VAR_NAME.fullmatch(name):
            raise ValueError(f"bad variable name {name!r}")
        return self.command("SET VARIABLE", name, quote(value)).ok

    def verbose(self, message: str, level: int = 1) -> None:
        self.command("VERBOSE", quote(message), str(int(level)))

    def exec_app(self, app: str, options: str) -> Optional[int]:
        """EXEC an application; the whole option string is one quoted word."""
        if not re.fullmatch(r"[A-Za-z]+", app):
            raise ValueError(f"bad application name {app!r}")
        resp = self.command("EXEC", app, quote(options))
        try:
            return int(resp.result) if resp.ok and resp.result is not None else None
        except ValueError:
            return None


def isatty_stdin() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (ValueError, OSError):
        return False
