"""A strict FastAGI peer: Asterisk's side of `AGI(agi://host:port/script,arg...)`.

It connects to a FastAGI server, sends the environment block that Asterisk 22 sends for a network
script (`agi_network: yes`, then `agi_network_script` with the text after the URL's first `/`,
query string included), answers commands exactly as the strict FakeAsterisk does (same parser,
same command table, same protocol checks), and plays Asterisk's FastAGI hangup rules
(Asterisk res/res_agi.c, launch_netscript and run_agi):

- the caller hanging up sends a bare `HANGUP` line (after the answer of a command in progress);
- the session ends when the server closes the connection; Asterisk then writes one last `HANGUP`;
- a line starting with `failure` ends the AGI with AGISTATUS=FAILURE;
- connection refused (or no answer to the connect within 2 s) is AGISTATUS=FAILURE at once;
- after a hangup Asterisk waits for the server to close, with no timeout of its own: a server that
  never closes is reported as a violation once `timeout` runs out.

Standard library only; POSIX only.
"""
from __future__ import annotations

import socket
import time
from typing import Any, Dict, List, Optional, Sequence

from agi_bitrix.testing.fake_asterisk import AGIProtocolError, AGIRun, FakeAsterisk

__all__ = ["FakeFastAGI", "MAX_AGI_CONNECT"]

MAX_AGI_CONNECT = 2.0  # res_agi.c: each address gets a 2000 ms non-blocking connect


class FakeFastAGI(FakeAsterisk):
    """Runs one `AGI(agi://host:port/script,args...)` against a FastAGI server."""

    def __init__(self, host: str, port: int, script: str, args: Sequence[str] = (), **kw: Any) -> None:
        kw.pop("env", None)  # a network script has no process environment
        super().__init__([f"agi://{host}:{port}/{script}"], args, **kw)
        self.host = host
        self.port = port
        self.network_script = script
        self.hangup_lines = 0
        self._sock: Optional[socket.socket] = None
        self._in_command = False
        self._hangup_line_due = False

    # --- Asterisk's network-specific behaviour -------------------------------------------------
    def env_block(self) -> bytes:
        extra: Dict[str, str] = {"agi_network": "yes"}
        if self.network_script:  # omitted when nothing follows the URL's '/'
            extra["agi_network_script"] = self.network_script
        extra.update(self.agi_env)
        saved, self.agi_env = self.agi_env, extra
        try:
            return super().env_block()
        finally:
            self.agi_env = saved

    def _request_name(self) -> str:
        return self.script[0]

    def hangup(self) -> None:
        was_dead = self._dead
        super().hangup()  # no process: marks the channel dead and AGISTATUS=HANGUP
        if was_dead or self._sock is None:
            return
        if self._in_command:
            self._hangup_line_due = True  # the command in progress is answered first
        else:
            self._send_hangup_line()

    def _send_hangup_line(self) -> None:
        self._hangup_line_due = False
        self.hangup_lines += 1
        self._sighup_sent = True  # the FastAGI form of the hangup signal
        self._send(b"HANGUP\n")

    def _dispatch(self, cmd: str) -> str:
        self._in_command = True
        try:
            return super()._dispatch(cmd)
        finally:
            self._in_command = False

    def _serve_line(self, raw: bytes, split_head: bool) -> Optional[str]:
        if raw[:7].lower() == b"failure":
            # A FastAGI server's way to say "not now": AGISTATUS=FAILURE, the dialplan goes on.
            self._commands.append(raw.rstrip(b"\n").decode("utf-8", "surrogateescape"))
            return "failure"
        stop = super()._serve_line(raw, split_head)
        if self._hangup_line_due and stop is None:
            self._send_hangup_line()
        return stop

    # --- running -------------------------------------------------------------------------------
    def run(self, stdin_extra: bytes = b"") -> AGIRun:
        self._reset()
        self.hangup_lines = 0
        self._hangup_line_due = False
        start = time.monotonic()
        self._deadline = start + self.timeout
        if self.hangup_after is not None and not self._dead:
            self._hangup_at = start + self.hangup_after
        stop = "refused"
        try:
            sock = socket.create_connection((self.host, self.port), timeout=MAX_AGI_CONNECT)
        except OSError:
            self._returnstatus = "FAILURE"  # refused or timed out: AGI() goes on at once
            sock = None
        if sock is not None:
            self._sock = sock
            sock.setblocking(False)
            self._in_fd = self._out_fd = sock.fileno()
            try:
                self._send(self.env_block() + stdin_extra)
                stop = self._serve(sock.fileno())
                if stop == "timeout" and not self._dead:
                    pass  # reported by _kill_for_timeout
                # End of the session: one more HANGUP unless the server closed first (then lost).
                self._send(b"HANGUP\n")
            finally:
                self._in_fd = self._out_fd = None
                self._sock = None
                sock.close()
        if stop == "failure":
            self._returnstatus = "FAILURE"
        end = time.monotonic()
        variables = dict(self.variables)
        variables["AGISTATUS"] = self._returnstatus
        result = AGIRun(
            returncode=0, commands=list(self._commands), exchanges=list(self._exchanges),
            variables=variables, set_variables=dict(self._set_vars), stdout_raw=bytes(self._stdout),
            stderr="", duration=end - start, sighup_sent=self._sighup_sent, agistatus=self._returnstatus,
            violations=list(self._violations))
        if self.strict and result.violations:
            raise AGIProtocolError(
                "AGI protocol violations:\n" + "\n".join(" - " + v for v in result.violations), result)
        return result

    def _kill_for_timeout(self) -> None:
        self._violation("server held the channel for %g s without closing (Asterisk waits forever)"
                        % self.timeout)

    def _fill(self, wait: float) -> None:
        try:
            super()._fill(wait)
        except OSError:  # reset by a server that died: Asterisk reads it as the end of the session
            self._eof = True

    def _unread_stdin(self) -> Optional[int]:
        return None  # FIONREAD on our end of a socket says nothing about what the server read


def run_fastagi(host: str, port: int, event: str, args: List[str], **kw: Any) -> AGIRun:
    """One call step as `AGI(agi://host:port/EVENT,ARG...)`."""
    return FakeFastAGI(host, port, event, args, **kw).run()
