"""Whole-process cost of one `incoming` event against the local Bitrix24 emulator.

Asterisk starts one process per call step, so what the caller feels is interpreter start +
imports + one REST request. Measured beside `python -c pass` in the same run; the ratio is what
to compare across machines. Run: make bench (or .venv/bin/python bench/agi_event.py [N]).
"""
from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import agi_bitrix
from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator

ENTRY = Path(sys.executable).with_name("agi-bitrix")
ENV_BLOCK = ("agi_request: agi-bitrix\nagi_channel: PJSIP/provider-00000001\nagi_language: en\n"
             "agi_type: PJSIP\nagi_uniqueid: {lid}\nagi_version: 22.10.1\nagi_callerid: 89161234567\n"
             "agi_calleridname: unknown\nagi_dnid: 74951234567\nagi_context: bitrix-inbound\n"
             "agi_extension: 74951234567\nagi_priority: 1\nagi_arg_1: incoming\n\n")


def measure(cmd: List[str], env: Dict[str, str], agi_lid: str = "") -> Tuple[float, float, int]:
    """Wall seconds, CPU seconds (user+sys) and peak RSS in KiB of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    if agi_lid:
        proc.stdin.write(ENV_BLOCK.format(lid=agi_lid).encode())
        proc.stdin.flush()
        for line in proc.stdout:  # answer each command as Asterisk does, one at a time
            answer = f"200 result=1 ({agi_lid})\n" if line.startswith(b"GET VARIABLE") else "200 result=1\n"
            proc.stdin.write(answer.encode())
            proc.stdin.flush()
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def run_events(runs: int) -> Tuple[List[Tuple[float, float, int]], List[Tuple[float, float, int]]]:
    """(baseline rows, event rows): `python -c pass` and one `incoming` process, interleaved."""
    with Bitrix24Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
        emu.add_user("Anna", "Bench", inner="101")
        settings = Path(tmp) / "settings.ini"
        settings.write_text(f"[bitrix24]\nwebhook_url = {emu.webhook_url}\n[calls]\ndefault_user = 101\n"
                            f"[storage]\nstate_dir = {tmp}/state\n[logging]\nfile = {tmp}/log\n")
        env = dict(os.environ, AGI_BITRIX_SETTINGS=str(settings), AST_AGI_DIR=tmp)
        base, event = [], []
        measure([str(ENTRY), "incoming"], env, "0.0")  # warm the page cache and .pyc files
        for i in range(runs):
            base.append(measure([sys.executable, "-c", "pass"], env))
            event.append(measure([str(ENTRY), "incoming"], env, f"1795000000.{i}"))
        assert len(emu.calls) == runs + 1, "every event must have registered its call"
    return base, event


def whole_event_ms(runs: int = 10) -> float:
    return statistics.median(r[0] for r in run_events(runs)[1]) * 1000


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    compileall.compile_dir(Path(agi_bitrix.__file__).parent, quiet=1)  # as an installed package runs
    load_before = os.getloadavg()
    base, event = run_events(runs)
    load_after = os.getloadavg()

    def med(rows: List[Tuple[float, float, int]], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    print(f"one `incoming` event (whole process, median of {runs}) vs `python -c pass`, "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after:")
    print(f"  wall time : {med(event, 0) * 1000:7.1f} ms vs {med(base, 0) * 1000:6.1f} ms"
          f"  ratio {med(event, 0) / med(base, 0):5.1f}x  (target <= 30x)")
    print(f"  CPU time  : {med(event, 1) * 1000:7.1f} ms vs {med(base, 1) * 1000:6.1f} ms"
          f"  ratio {med(event, 1) / max(med(base, 1), 1e-6):5.1f}x  (target <= 6x)")
    print(f"  peak RSS  : {med(event, 2) / 1024:7.1f} MiB vs {med(base, 2) / 1024:6.1f} MiB"
          f"  ratio {med(event, 2) / med(base, 2):5.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
