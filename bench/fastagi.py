"""Process mode vs FastAGI (`agi-bitrix service`): CPU and latency per call step, 1, 20 and 100 at once.

Both serve the same `incoming` step against the local Bitrix24 emulator with the default 2 s
budget. Process mode: one `agi-bitrix` process per step (CPU from the kernel's accounting of each
child). FastAGI: one `agi-bitrix service` process (CPU from /proc, before and after the burst),
the steps sent by the strict FastAGI peer. Latency is connect (or process start) to the step's
end as Asterisk sees it. Everything is shown beside `python -c pass` measured in the same run, so
the ratios compare across machines. Also: what the `answer` step adds between the employee's
pick-up and the bridge. Run: make bench (or .venv/bin/python bench/fastagi.py).

The portal's round trip as the steps met it is measured in the same run: each step's log line
says how long it waited for the portal's answers (`portal_ms`; one request per `incoming`), and
the table shows its p95 beside the steps' p95 and the difference: what the step itself added.
The FastAGI rows are measured twice: with the default `[service] batch_window` (a register waits
up to 0.3 s to share a request with other calls) and, after a reload, with `batch_window = 0`
(`window 0`: it goes with the courier's next request).
"""
from __future__ import annotations

import compileall
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import agi_bitrix
from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from agi_bitrix.testing.fake_asterisk import FakeAsterisk
from agi_bitrix.testing.fake_fastagi import FakeFastAGI

ENTRY = Path(sys.executable).with_name("agi-bitrix")
TICK = os.sysconf("SC_CLK_TCK")
PEER_PROCESSES = 4
SINGLE = 20  # steps measured one after another for "1 at once"
Step = Tuple[float, float, str]  # latency s, CPU s (process mode; 0 for FastAGI), BITRIX_STATUS
Burst = Tuple[List[float], float, List[str], List[str]]  # latencies, CPU per step, statuses, linkedids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline(runs: int = 10) -> Tuple[float, float]:
    """Median wall and CPU seconds of `python -c pass`."""
    rows = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        _, _, usage = os.wait4(proc.pid, 0)
        rows.append((time.perf_counter() - start, usage.ru_utime + usage.ru_stime))
    return statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)


def caller(lid: str) -> str:
    """A caller of its own for each step (the service remembers numbers it has parsed)."""
    return f"8916{int(lid.rsplit('.', 1)[1]) % 10 ** 7:07d}"


def peer_batch(port: int, lids: List[str]) -> List[Tuple[float, str]]:
    """In a helper process: these steps at once over FastAGI; (latency, BITRIX_STATUS) each.

    The peers run in a few processes of their own, so their CPU is neither in the service's nor
    in the emulator's way (one Python process for 100 peers would measure its own GIL).
    """
    def one(lid: str) -> Tuple[float, str]:
        run = FakeFastAGI("127.0.0.1", port, "incoming", [caller(lid)], linkedid=lid, timeout=120).run()
        return run.duration, run.set_variables.get("BITRIX_STATUS", "-")

    with ThreadPoolExecutor(max(1, len(lids))) as pool:
        return list(pool.map(one, lids))


def fastagi_burst(peers: ProcessPoolExecutor, port: int, lids: List[str], pid: int) -> Burst:
    chunks = [lids[i::PEER_PROCESSES] for i in range(PEER_PROCESSES) if lids[i::PEER_PROCESSES]]
    cpu_before = service_cpu(pid)
    results = [r for part in peers.map(peer_batch, [port] * len(chunks), chunks) for r in part]
    per_step = (service_cpu(pid) - cpu_before) / len(lids)
    return [r[0] for r in results], per_step, [r[1] for r in results], [lid for part in chunks for lid in part]


def service_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def burst(lids: List[str], one: Callable[[str], object], cpu: Callable[[], float]) -> Burst:
    """These steps at once: their latencies, CPU per step, statuses, linkedids."""
    cpu_before = cpu()
    with ThreadPoolExecutor(len(lids)) as pool:
        runs = list(pool.map(one, lids))
    per_step = (cpu() - cpu_before) / len(lids)
    return ([r.duration for r in runs], per_step, [r.set_variables.get("BITRIX_STATUS", "-") for r in runs],
            lids)


def joined(bursts: List[Burst]) -> Burst:
    """Bursts measured one after another, as one row."""
    return ([x for b in bursts for x in b[0]], statistics.mean(b[1] for b in bursts),
            [x for b in bursts for x in b[2]], [x for b in bursts for x in b[3]])


def portal_waits(log: Path, lids: List[str]) -> List[float]:
    """Seconds each of these steps waited for the portal, from their log lines."""
    wanted, found = set(lids), []
    for line in log.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry.get("linkedid") in wanted and entry.get("event") == "incoming":
            found.append(entry.get("portal_ms", 0) / 1000)
    return found


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def p(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> int:
    sizes = [int(a) for a in sys.argv[1:]] or [1, 20, 100]
    compileall.compile_dir(Path(agi_bitrix.__file__).parent, quiet=1)  # as an installed package runs
    load_before = os.getloadavg()
    base_wall, base_cpu = baseline()
    lid = iter(range(10 ** 6))
    with Bitrix24Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
        emu.add_user("Anna", "Bench", inner="101")
        emu.add_user("Boris", "Bench", inner="102")
        port = free_port()
        settings = Path(tmp) / "settings.ini"
        text = (f"[bitrix24]\nwebhook_url = {emu.webhook_url}\nrate_burst = 5000\nrate_per_second = 1000\n"
                f"[calls]\ndefault_user = 101\n[storage]\nstate_dir = {tmp}/state\n[logging]\nfile = {tmp}/log\n"
                f"[service]\nfastagi = 127.0.0.1:{port}\nflush_interval = 3600\n"
                f"[events]\nlisten = 127.0.0.1:{free_port()}\n")
        settings.write_text(text)
        env = {"AGI_BITRIX_SETTINGS": str(settings)}

        def process_step(event: str, args: List[str], linkedid: str) -> object:
            return FakeAsterisk([str(ENTRY)], [event] + args, env=env, linkedid=linkedid, timeout=120).run()

        def fastagi_step(event: str, args: List[str], linkedid: str) -> object:
            return FakeFastAGI("127.0.0.1", port, event, args, linkedid=linkedid, timeout=120).run()

        service = subprocess.Popen([str(ENTRY), "service"], env=dict(os.environ, **env),
                                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        peers = ProcessPoolExecutor(PEER_PROCESSES, mp_context=multiprocessing.get_context("spawn"))
        try:
            list(peers.map(peer_batch, [port] * PEER_PROCESSES, [[] for _ in range(PEER_PROCESSES)]))  # start them
            for _ in range(600):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            # warm both paths (page cache, .pyc files, the service's first imports)
            process_step("incoming", ["89161234567"], "warm.1")
            fastagi_step("incoming", ["89161234567"], "warm.2")
            rows: Dict[Tuple[str, int], Burst] = {}
            for n in sizes:
                # One at once: SINGLE steps one after another (the kernel counts CPU in 10 ms ticks).
                rounds = SINGLE if n == 1 else 1
                rows[("process", n)] = joined([burst([f"1795700000.{next(lid)}" for _ in range(n)],
                                                     lambda key: process_step("incoming", [caller(key)], key),
                                                     children_cpu) for _ in range(rounds)])
                rows[("fastagi", n)] = joined([fastagi_burst(peers, port, [f"1795700000.{next(lid)}" for _ in range(n)],
                                                             service.pid) for _ in range(rounds)])
            # The same service with `[service] batch_window = 0` (reload): a register goes with the
            # next request instead of waiting up to 0.3 s to share one.
            def reload(content: str, times: int) -> None:
                settings.write_text(content)
                service.send_signal(signal.SIGHUP)
                while (Path(tmp) / "log").read_text(encoding="utf-8").count('"service_reloaded"') < times:
                    time.sleep(0.05)

            reload(text.replace("flush_interval = 3600\n", "flush_interval = 3600\nbatch_window = 0\n"), 1)
            for n in sizes:
                rounds = SINGLE if n == 1 else 1
                rows[("window 0", n)] = joined([fastagi_burst(peers, port, [f"1795700000.{next(lid)}" for _ in range(n)],
                                                              service.pid) for _ in range(rounds)])
            reload(text, 2)  # the `answer` step below with the defaults again
            import requests

            trips = []
            for _ in range(20):
                start = time.perf_counter()
                requests.post(emu.webhook_url + "telephony.externalcall.register",
                              json={"USER_PHONE_INNER": "101", "PHONE_NUMBER": "+79161234567", "TYPE": 2,
                                    "EXTERNAL_CALL_ID": f"trip.{next(lid)}"}, timeout=10)
                trips.append(time.perf_counter() - start)
            trip = statistics.median(trips)
            waits = {key: portal_waits(Path(tmp) / "log", row[3]) for key, row in rows.items()}
            answer = {}
            for mode, step in (("process", process_step), ("fastagi", fastagi_step)):
                lats = []
                for i in range(5):
                    key = f"1795800000.{next(lid)}"
                    step("incoming", ["89161234567"], key)
                    lats.append(step("answer", [], key).duration)
                answer[mode] = statistics.median(lats)
        finally:
            peers.shutdown()
            service.send_signal(signal.SIGTERM)
            service.wait(60)

    load_after = os.getloadavg()
    print("one `incoming` call step, against the local emulator, default 2 s budget")
    print(f"baseline `python -c pass`: {base_cpu * 1000:.1f} ms CPU, {base_wall * 1000:.1f} ms wall; "
          f"the portal's round trip (one register, new connection, nothing else running): {trip * 1000:.1f} ms; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    print(f"{'':8}{'at once':>8}  {'CPU/step':>9} {'x pass':>7}   {'latency p50':>11} {'p95':>8} {'x pass':>7}"
          f"   {'portal p95':>10} {'p95-portal':>10}   QUEUED")
    for (mode, n), (lats, cpu, statuses, _) in rows.items():
        queued = sum(s != "OK" for s in statuses)
        portal = p(waits[(mode, n)], 0.95) if waits[(mode, n)] else float("nan")
        print(f"{mode:8}{n:>8}  {cpu * 1000:7.1f}ms {cpu / base_cpu:6.1f}x   {p(lats, 0.5) * 1000:9.1f}ms "
              f"{p(lats, 0.95) * 1000:6.1f}ms {p(lats, 0.5) / base_wall:6.1f}x   {portal * 1000:8.1f}ms "
              f"{(p(lats, 0.95) - portal) * 1000:8.1f}ms   {queued}/{len(statuses)}")
    print(f"\nthe `answer` step between pick-up and bridge (median of 5): process "
          f"{answer['process'] * 1000:.1f} ms, FastAGI {answer['fastagi'] * 1000:.1f} ms "
          f"({answer['process'] / answer['fastagi']:.0f}x less)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
