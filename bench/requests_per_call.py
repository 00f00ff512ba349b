"""REST requests per answered incoming call, through the real entry point against the emulator.

One call = `incoming` -> `answer` -> `hangup ANSWER` with a recording, each step a process run
under the fake Asterisk, as Asterisk would. Counted: HTTP requests that reach the portal (a
`batch` is one request, as the portal's rate limit counts it) and requests to the OAuth server.
Target: 2 per call (register, finish) + 1 for the recording; + 1 batch when the card moves to
another employee of a ring group. Prints figures only. Run: .venv/bin/python bench/requests_per_call.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from agi_bitrix.testing.fake_asterisk import FakeAsterisk

ENTRY = Path(sys.executable).with_name("agi-bitrix")
INBOUND = dict(channel="PJSIP/provider-00000001", context="bitrix-inbound", extension="74951234567",
               dnid="74951234567", callerid="+79161234567")


class Box:
    """A PBX in a temp folder pointed at the emulator, in webhook or OAuth mode."""

    def __init__(self, root: Path, emu: Bitrix24Emulator, mode: str) -> None:
        self.root, self.emu = root, emu
        self.settings = root / "settings.ini"
        b24 = (f"webhook_url = {emu.webhook_url}\n" if mode == "webhook" else
               f"portal_url = {emu.base_url}\nclient_id = {emu.client_id}\n"
               f"client_secret = {emu.client_secret}\noauth_url = {emu.oauth_url}\n")
        self.settings.write_text(f"[bitrix24]\n{b24}timeout = 5\n[calls]\ndefault_user = 101\n"
                                 f"[storage]\nstate_dir = {root}/state\n[logging]\nfile = {root}/agi-bitrix.log\n")
        self.env = {"AGI_BITRIX_SETTINGS": str(self.settings)}
        if mode == "oauth":
            env = dict(os.environ, **self.env)
            subprocess.run([str(ENTRY), "auth", "--code"], env=env, check=True, capture_output=True,
                           input=emu.authorization_code(), text=True)

    def step(self, args: List[str], **kw: object) -> str:
        run = FakeAsterisk([str(ENTRY)], args, env=self.env, timeout=60, **kw).run()  # type: ignore[arg-type]
        return run.set_variables.get("BITRIX_STATUS", "?")

    def call(self, lid: str, answered_by: str) -> Tuple[List[str], List[str]]:
        """One answered call with a recording; returns (portal requests, statuses)."""
        before = len(self.emu.requests)
        rec = self.root / f"rec-{lid}.wav"
        rec.write_bytes(b"RIFF" + b"\0" * 2000)
        past = time.time() - 30  # MixMonitor closed the file a while ago
        os.utime(rec, (past, past))
        statuses = [self.step(["incoming", "", "74951234567"], linkedid=lid, **INBOUND),
                    self.step(["answer"], linkedid=lid, channel=f"PJSIP/{answered_by}-0000000a")]
        statuses.append(self.step(["hangup", "ANSWER", "7", str(rec)], linkedid=lid, dead=True, **INBOUND))
        fresh = self.emu.requests[before:]
        return [r["method"] for r in fresh if not r["batch"]], statuses


def describe(methods: List[str]) -> str:
    portal = [m for m in methods if m != "oauth.token"]
    short = [m.replace("telephony.externalcall.", "") for m in portal]
    token = len(methods) - len(portal)
    extra = f" + {token} to the OAuth server" if token else ""
    return f"{len(portal)} REST requests{extra}: {', '.join(short)}"


def main() -> int:
    rows: List[Tuple[str, str, List[str]]] = []
    for mode in ("webhook", "oauth"):
        with Bitrix24Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
            for inner, name in (("101", "Anna"), ("102", "Boris")):
                emu.add_user(name, "Bench", inner=inner)
            box = Box(Path(tmp), emu, mode)
            cases: Dict[str, Tuple[str, str]] = {
                "answered by the employee shown the card": ("1795700000.1", "101"),
                "card moves to another employee (first time)": ("1795700000.2", "102"),
                "card moves to another employee (user id cached)": ("1795700000.3", "102"),
            }
            for label, (lid, who) in cases.items():
                methods, statuses = box.call(lid, who)
                # `answer` says QUEUED when it leaves a card move to its background delivery.
                assert statuses[0] == statuses[2] == "OK" and statuses[1] in ("OK", "QUEUED"), \
                    f"{mode} {label}: {statuses}"
                rows.append((mode, label, methods))
            if mode == "oauth":
                emu.expire_access_tokens()  # once an hour: what the first call after expiry costs
                methods, statuses = box.call("1795700000.4", "101")
                rows.append((mode, "first call after the access token expired", methods))
            assert not emu.internal_errors
    print("REST requests per answered incoming call with a recording (target 2 + 1 for the recording):")
    for mode, label, methods in rows:
        print(f"  {mode:<8} {label:<50} {describe(methods)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
