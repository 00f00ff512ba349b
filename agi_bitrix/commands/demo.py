"""`agi-bitrix demo`: simulated calls through the real entry point against the built-in emulator.

Each call step runs the installed `agi-bitrix` script as Asterisk would (a fresh process fed the
AGI environment block by the fake Asterisk); the emulator plays the Bitrix24 portal. Then a call
goes through `agi-bitrix service` over FastAGI, and one step shows the dialplan's fallback to
process mode once the service is stopped. At the end it prints what the portal received.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from agi_bitrix.testing.fake_asterisk import FakeAsterisk
from agi_bitrix.testing.fake_fastagi import FakeFastAGI

# The demo's portal is on this machine: a budget of 10 s only matters on a loaded one, where a
# step of 2 s would end QUEUED and the demo would show a call short.
SETTINGS = """[bitrix24]
webhook_url = {webhook}
timeout = 10
[calls]
default_user = 101
crm_create = yes
anonymous_number = 0000
[storage]
state_dir = {state}
[logging]
file = {log}
[asterisk]
dial_template = PJSIP/{{number}}@provider
dial_timeout = 45
[service]
fastagi = 127.0.0.1:{fastagi}
flush_interval = 3600
[events]
listen = 127.0.0.1:{http}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def entry_point() -> List[str]:
    """The installed console script next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("agi-bitrix")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("agi-bitrix")
    return [found] if found else [sys.executable, "-m", "agi_bitrix"]


class Demo:
    def __init__(self, folder: Path, emulator: Bitrix24Emulator) -> None:
        self.folder = folder
        self.emulator = emulator
        self.settings = folder / "settings.ini"
        self.log = folder / "agi-bitrix.log"
        self.port = _free_port()
        self.settings.write_text(SETTINGS.format(webhook=emulator.webhook_url, state=folder / "state",
                                                 log=self.log, fastagi=self.port, http=_free_port()),
                                 encoding="utf-8")
        self.settings.chmod(0o600)
        self.script = entry_point()
        self.seq = 0

    def step(self, linkedid: str, args: List[str], **kw: Any) -> Any:
        self.seq += 1
        kw.setdefault("uniqueid", f"{linkedid.rsplit('.', 1)[0]}.{self.seq}")
        fake = FakeAsterisk(self.script, args, linkedid=linkedid,
                            env={"AGI_BITRIX_SETTINGS": str(self.settings)}, **kw)
        lines = self._log_lines()
        run = fake.run()
        self._wait_for_delivery(args[0], lines)
        status = run.set_variables.get("BITRIX_STATUS", "?")
        extra = ""
        if run.executed_apps():
            app, opts = run.executed_apps()[0]
            extra = f"  EXEC {app}({opts})"
        shown = ", ".join(a if a.isprintable() else repr(a) for a in ["agi-bitrix"] + args)
        print(f"    AGI({shown}) -> BITRIX_STATUS={status}{extra}")
        return run

    def _wait_for_delivery(self, event: str, lines: int) -> None:
        if event == "answer":  # it delivers after returning; its log line comes when it is done
            end = time.monotonic() + 30
            while self._log_lines() == lines and time.monotonic() < end:
                time.sleep(0.05)

    def _log_lines(self) -> int:
        try:
            return len(self.log.read_text(encoding="utf-8").splitlines())
        except OSError:
            return 0

    def fastagi_step(self, linkedid: str, args: List[str], fallback: bool = False, **kw: Any) -> Any:
        """A step as the sample's [bitrix-step] runs it: FastAGI, else the same step as a process."""
        kw.setdefault("uniqueid", linkedid)
        lines = self._log_lines()
        started = time.monotonic()
        run = FakeFastAGI("127.0.0.1", self.port, args[0], args[1:], linkedid=linkedid, **kw).run()
        ms = (time.monotonic() - started) * 1000
        self._wait_for_delivery(args[0], lines)
        shown = ", ".join(args[1:])
        status = run.set_variables.get("BITRIX_STATUS")
        print(f"    AGI(agi://127.0.0.1:{self.port}/{args[0]}{', ' if shown else ''}{shown}) -> "
              + (f"BITRIX_STATUS={status}  ({ms:.0f} ms)" if status else f"AGISTATUS={run.agistatus}"))
        if fallback and (run.agistatus == "FAILURE" or not status):
            return self.step(linkedid, args, **kw)
        return run

    def start_service(self) -> "subprocess.Popen[bytes]":
        env = dict(os.environ, AGI_BITRIX_SETTINGS=str(self.settings))
        env.pop("AST_AGI_DIR", None)
        proc = subprocess.Popen(self.script + ["service"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
        for _ in range(600):  # until it listens (a loaded machine starts Python slowly)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return proc
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("agi-bitrix service did not start (see the log)")
                time.sleep(0.05)
        proc.kill()
        raise RuntimeError("agi-bitrix service did not start listening")


def _describe(call: Dict[str, Any], users: Dict[int, str]) -> List[str]:
    reg = call.get("register", {})
    kind = {1: "outgoing", 2: "incoming"}.get(call.get("type"), str(call.get("type")))
    lines = [f"  {call['CALL_ID']}",
             f"    register: {kind} {reg.get('PHONE_NUMBER')} for {users.get(call.get('user_id'), call.get('user_id'))},"
             f" line {reg.get('LINE_NUMBER') or '-'}, EXTERNAL_CALL_ID {reg.get('EXTERNAL_CALL_ID')}"]
    if call.get("crm_created_lead"):
        lines.append(f"    CRM: new lead #{call['crm_created_lead']}")
    elif call.get("crm_entity_type"):
        lines.append(f"    CRM: bound to {call['crm_entity_type']} #{call['crm_entity_id']}")
    for action, user in call.get("card_events", []):
        lines.append(f"    card: {action} for {users.get(user, user)}")
    if call.get("finished"):
        fin = call.get("finish") or {}
        lines.append(f"    finish: STATUS_CODE {call.get('status_code')}, DURATION {call.get('duration')} s,"
                     f" by {users.get(call.get('finish_user_id'), call.get('finish_user_id'))}"
                     + (f", reason {fin['FAILED_REASON']}" if fin.get("FAILED_REASON") else ""))
    else:
        lines.append("    finish: NOT FINISHED")
    if call.get("record"):
        lines.append(f"    recording: {call['record']['filename']} ({len(call['record']['content'])} bytes)")
    return lines


def scenarios(demo: Demo, folder: Path) -> None:
    print("1. Incoming call from a known client; the ring group rings, Boris (102) answers")
    lid = "1795300000.10"
    demo.step(lid, ["incoming", "", "74951234567"], channel="PJSIP/provider-00000001",
              callerid="+79161234567", dnid="74951234567", context="bitrix-inbound", extension="74951234567")
    demo.step(lid, ["answer"], channel="PJSIP/102-00000003", context="bitrix-answer")
    time.sleep(1.2)
    rec = folder / "call-1.wav"
    rec.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(28))
    os.utime(rec, (time.time() - 10, time.time() - 10))  # a finished recording, as MixMonitor leaves it
    demo.step(lid, ["hangup", "ANSWER", "1", str(rec)], channel="PJSIP/provider-00000001", dead=True,
              context="bitrix-hangup")

    print("2. Missed call from an unknown number (a lead is created)")
    lid = "1795300100.20"
    demo.step(lid, ["incoming", "", "74951234567"], channel="PJSIP/provider-00000004", callerid="89031234567")
    demo.step(lid, ["hangup", "NOANSWER", ""], channel="PJSIP/provider-00000004", dead=True)

    print("3. Anna (101) calls a client who is busy")
    lid = "1795300200.30"
    demo.step(lid, ["outgoing"], channel="PJSIP/101-00000006", callerid="101", extension="84957654321")
    demo.step(lid, ["hangup", "BUSY", ""], channel="PJSIP/101-00000006", dead=True)

    print("4. Outbound dialing through `dial` (the number is validated, registered and dialed)")
    lid = "1795300300.40"

    def dial_app(fake: Any, options: str) -> int:
        fake.variables.update(DIALSTATUS="ANSWER", ANSWEREDTIME="3")
        return 0

    demo.step(lid, ["dial", "8 (916) 765-43-21", "103"], channel="PJSIP/103-00000008", callerid="103",
              apps={"Dial": dial_app})
    demo.step(lid, ["hangup", "ANSWER", "3"], channel="PJSIP/103-00000008", dead=True)

    print("5. A hostile caller ID (quotes, a newline, '&'): registered as anonymous, nothing injected")
    lid = "1795300400.50"
    demo.step(lid, ["incoming", '12"3\nEXEC System reboot&PJSIP/evil', "74951234567"],
              channel="PJSIP/provider-00000009")
    demo.step(lid, ["hangup", "CANCEL", ""], channel="PJSIP/provider-00000009", dead=True)

    print("6. The same kind of call through `agi-bitrix service` (FastAGI: no Python start per step)")
    service = demo.start_service()
    try:
        lid = "1795300500.60"
        demo.fastagi_step(lid, ["incoming", "", "74951234567"], channel="PJSIP/provider-0000000b",
                          callerid="+79161234567", dnid="74951234567")
        demo.fastagi_step(lid, ["answer"], channel="PJSIP/101-0000000c")
        demo.fastagi_step(lid, ["hangup", "ANSWER", "4"], channel="PJSIP/provider-0000000b", dead=True)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)
    print("7. The service is stopped: the dialplan's [bitrix-step] runs the step as a process instead")
    lid = "1795300600.70"
    demo.fastagi_step(lid, ["incoming", "", "74951234567"], fallback=True, channel="PJSIP/provider-0000000d",
                      callerid="89031234567")
    demo.fastagi_step(lid, ["hangup", "NOANSWER", ""], fallback=True, channel="PJSIP/provider-0000000d", dead=True)


def run(args: Any) -> int:
    from agi_bitrix.commands.demo_widgets import dialer_card

    keep: Optional[str] = getattr(args, "keep", None)
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="agi-bitrix-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with Bitrix24Emulator() as emulator:
            people = {101: ("Anna", "Petrova"), 102: ("Boris", "Ivanov"), 103: ("Vera", "Smirnova")}
            users: Dict[int, str] = {}
            by_inner: Dict[str, int] = {}
            for inner, (name, last) in people.items():
                user = emulator.add_user(name, last, inner=str(inner))
                users[int(user["ID"])] = f"{name} ({inner})"
                by_inner[str(inner)] = int(user["ID"])
            emulator.add_contact("Ivan Sidorov", ["+79161234567"], assigned_by_id=int(next(iter(users))))
            print(f"Bitrix24 emulator at {emulator.base_url}; settings, state and log in {folder}\n")
            demo = Demo(folder, emulator)
            scenarios(demo, folder)
            print("8. The auto-dialer calls a task's client; Boris's Bitrix24 call card marks the call")
            marked = dialer_card(folder, emulator, demo.script, by_inner)
            print("\nWhat Bitrix24 received:")
            for call in sorted(emulator.calls.values(), key=lambda c: c["registered_at"]):
                print("\n".join(_describe(call, users)))
            total = len(emulator.requests)
            print(f"\n{len(emulator.calls)} calls, {total} REST requests; log: {folder / 'agi-bitrix.log'}")
            unfinished = [c for c in emulator.calls.values() if not c.get("finished")]
            if not marked:
                print("agi-bitrix demo: the dialer call got no mark in its call card", file=sys.stderr)
                return 1
            if unfinished:
                print(f"agi-bitrix demo: {len(unfinished)} call(s) were not finished", file=sys.stderr)
                return 1
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0
