"""The shared store (PostgreSQL) beside SQLite, in one run.

1. Per-step cost: one `incoming` step as its own process (as Asterisk runs it), on SQLite and on
   a throwaway PostgreSQL (agi_bitrix.testing.postgres), interleaved; medians of wall and CPU
   time of the step's process (PostgreSQL's own CPU is not in it).
2. Requests per second two PBXs hold together against the emulator's leaky bucket (scaled: 50
   requests, draining 10 a second; each PBX allows itself a burst of 40 at 8 a second), both
   busy for a few seconds: on one shared budget, and each on its own.

Run: make bench (or .venv/bin/python bench/shared_store.py [N]).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agi_event import ENTRY, measure  # noqa: E402

from agi_bitrix.shared import schema  # noqa: E402
from agi_bitrix.shared.connect import connect  # noqa: E402
from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator  # noqa: E402
from agi_bitrix.testing.postgres import Cluster  # noqa: E402


def settings_file(folder: Path, webhook: str, url: str = "", pbx: str = "", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "settings.ini"
    shared = f"url = {url}\npbx_id = {pbx}\n" if url else ""
    path.write_text(f"[bitrix24]\nwebhook_url = {webhook}\n{extra}[calls]\ndefault_user = 101\n"
                    f"[storage]\nstate_dir = {folder}/state\n{shared}[logging]\nfile = {folder}/log\n"
                    "[service]\nflush_interval = 3600\n")
    return path


def migrated(cluster: Cluster) -> str:
    url = cluster.url(cluster.database())
    conn = connect(url, "bench", 30)
    schema.migrate(conn, url)
    conn.close()
    return url


def per_step(runs: int, cluster: Cluster) -> Dict[str, List[Tuple[float, float, int]]]:
    rows: Dict[str, List[Tuple[float, float, int]]] = {"sqlite": [], "postgresql": []}
    with Bitrix24Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
        emu.add_user("Anna", "Bench", inner="101")
        url = migrated(cluster)
        envs = {"sqlite": settings_file(Path(tmp) / "s", emu.webhook_url),
                "postgresql": settings_file(Path(tmp) / "p", emu.webhook_url, url, "bench")}
        for engine, path in envs.items():
            env = dict(os.environ, AGI_BITRIX_SETTINGS=str(path), AST_AGI_DIR=tmp)
            measure([str(ENTRY), "incoming"], env, f"1795000000.w{engine}")  # warm up
        for i in range(runs):
            for engine, path in envs.items():
                env = dict(os.environ, AGI_BITRIX_SETTINGS=str(path), AST_AGI_DIR=tmp)
                rows[engine].append(measure([str(ENTRY), "incoming"], env, f"1795000000.{i}"))
        assert len(emu.calls) == 2 * runs + 2, "every step must have registered its call"
    return rows


def two_pbxs(shared: bool, cluster: Cluster, seconds: float = 6.0) -> Tuple[float, int, int]:
    """(requests/s answered, 503 answers, requests) of two PBXs calling flat out for `seconds`."""
    from agi_bitrix.service.core import Service
    from agi_bitrix.testing.fake_fastagi import FakeFastAGI

    with Bitrix24Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
        emu.add_user("Anna", "Bench", inner="101")
        emu.set_bucket(50, 10.0)
        url = migrated(cluster) if shared else ""
        services = []
        for name in "ab":
            port = free_port()
            path = settings_file(Path(tmp) / name, emu.webhook_url, url, f"office-{name}",
                                 "timeout = 30\nrate_burst = 40\nrate_per_second = 8\n")
            with open(path, "a") as fh:
                fh.write(f"fastagi = 127.0.0.1:{port}\n[events]\nlisten = 127.0.0.1:{free_port()}\n")
            services.append(Service(str(path)))
            services[-1].start()
        stop = time.monotonic() + seconds

        def caller(svc: object, tag: str) -> None:
            host, port = svc.fastagi.address  # type: ignore[attr-defined]
            i = 0
            while time.monotonic() < stop:
                FakeFastAGI(host, port, "incoming", ["89161234567"], linkedid=f"{tag}.{i}").run()
                i += 1

        started = time.monotonic()
        threads = [threading.Thread(target=caller, args=(svc, f"17950{n}{k}")) for n, svc in enumerate(services)
                   for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        for svc in services:
            svc.stop()
        regs = emu.requests_for("telephony.externalcall.register")
        ok = sum(1 for r in regs if r["status"] == 200)
        return ok / elapsed, sum(1 for r in regs if r["status"] == 503), len(regs)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    with Cluster() as cluster:
        rows = per_step(runs, cluster)

        def med(engine: str, i: int) -> float:
            return statistics.median(r[i] for r in rows[engine])

        print(f"one `incoming` step as its own process, median of {runs}, PostgreSQL vs SQLite:")
        print(f"  wall time : {med('postgresql', 0) * 1000:7.1f} ms vs {med('sqlite', 0) * 1000:6.1f} ms"
              f"  ratio {med('postgresql', 0) / med('sqlite', 0):4.2f}x")
        print(f"  CPU time  : {med('postgresql', 1) * 1000:7.1f} ms vs {med('sqlite', 1) * 1000:6.1f} ms"
              f"  ratio {med('postgresql', 1) / med('sqlite', 1):4.2f}x")
        print("two PBXs flat out against the portal's bucket (50, draining 10/s; each PBX: burst 40, 8/s):")
        for shared in (True, False):
            rate, refused, total = two_pbxs(shared, cluster)
            what = "one shared budget (PostgreSQL)" if shared else "each its own budget (SQLite)  "
            print(f"  {what}: {rate:5.1f} requests/s answered, {refused} of {total} refused with 503")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
