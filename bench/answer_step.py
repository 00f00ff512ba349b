"""What the `answer` step adds between the employee's answer and the bridge.

The step runs in Dial's U() gosub: Asterisk bridges the call only once the AGI process has
exited (res_agi.c waits for it), so the client hears nothing for the whole process time. The
step runs under the fake Asterisk (a ring group of three, the card moving to the one who
answered), with the portal answering at once and with it taking SLOW seconds per request, beside
`python -c pass` under the same fake in the same run. Slow and normal should take the same time:
the card move is delivered after the step returned. Run: make bench (or
.venv/bin/python bench/answer_step.py [N]).
"""
from __future__ import annotations

import compileall
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import agi_bitrix
from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from agi_bitrix.testing.fake_asterisk import FakeAsterisk

ENTRY = Path(sys.executable).with_name("agi-bitrix")
SLOW = 1.5  # seconds the slow portal takes per request (the step's own budget is 2 s)


def _answer(emu: Bitrix24Emulator, env: dict, lid: str) -> float:
    """Wall seconds Asterisk waits for `answer` on a fresh ring-group call."""
    FakeAsterisk([str(ENTRY)], ["incoming", "89161234567"], env=env, linkedid=lid,
                 variables={"BITRIX_RING": "PJSIP/101&PJSIP/102&PJSIP/103"}).run()
    run = FakeAsterisk([str(ENTRY)], ["answer"], env=env, linkedid=lid, channel="PJSIP/102-00000001").run()
    assert run.set_variables.get("BITRIX_STATUS") in ("OK", "QUEUED"), run.set_variables
    # Let the delivering child finish before the next call (it does not hold Asterisk).
    end = time.monotonic() + 30
    while time.monotonic() < end and not any(
            c["external_call_id"] == lid and len(c["shown"]) == 1 for c in emu.calls.values()):
        time.sleep(0.02)
    return run.duration


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    compileall.compile_dir(Path(agi_bitrix.__file__).parent, quiet=1)  # as an installed package runs
    with Bitrix24Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
        for inner, name in (("101", "Anna"), ("102", "Boris"), ("103", "Vera")):
            emu.add_user(name, "Bench", inner=inner)
        settings = Path(tmp) / "settings.ini"
        settings.write_text(f"[bitrix24]\nwebhook_url = {emu.webhook_url}\n[calls]\ndefault_user = 101\n"
                            f"[storage]\nstate_dir = {tmp}/state\n[logging]\nfile = {tmp}/log\n")
        env = {"AGI_BITRIX_SETTINGS": str(settings)}
        base: List[float] = []
        normal: List[float] = []
        slow: List[float] = []
        for i in range(runs):  # interleaved, so a busy moment of the machine hits all three alike
            base.append(FakeAsterisk([sys.executable, "-c", "pass"], env=env).run().duration)
            emu.set_delay(0)
            normal.append(_answer(emu, env, f"1795900000.{i}"))
            emu.set_delay(SLOW)
            slow.append(_answer(emu, env, f"1795900001.{i}"))
    b, n, s = (statistics.median(x) * 1000 for x in (base, normal, slow))
    print(f"`answer` step: time Asterisk waits before the bridge (median of {runs}, process mode)")
    print(f"  python -c pass      : {b:7.1f} ms")
    print(f"  portal normal       : {n:7.1f} ms  ratio to python {n / b:5.1f}x")
    print(f"  portal slow ({SLOW:g} s) : {s:7.1f} ms  ratio to python {s / b:5.1f}x")
    print(f"  slow / normal       : {s / n:5.2f}  (1.0 = the portal's speed never reaches the caller)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
