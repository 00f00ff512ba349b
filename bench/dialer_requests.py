"""REST requests the dialer spends scanning due tasks, and 503s under the portal's real limit.

100 due tasks of the CallCenter group, each bound to a contact with a phone; one pass of
`agi-bitrix dialer run --once` reads the group, its operators, the tasks and their clients.
All clients are outside calling hours, so the pass scans everything and dials nobody. The
emulator enforces the cloud leaky bucket (burst 50, drain 2/s). Target: at most 10 requests
per 100 due tasks, zero 503s.
Run: .venv/bin/python bench/dialer_requests.py [TASKS]
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from agi_bitrix.testing.fake_ami import FakeAMI

ENTRY = Path(sys.executable).with_name("agi-bitrix")


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    past = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat(timespec="seconds")
    with Bitrix24Emulator(bucket_size=50, drain_per_second=2.0) as emu, FakeAMI() as ami, \
            tempfile.TemporaryDirectory() as tmp:
        ops = [int(emu.add_user(n, "Bench", inner=i)["ID"]) for n, i in (("Anna", "101"), ("Boris", "102"))]
        group = emu.add_group("CallCenter", ops)
        for i in range(count):
            contact = emu.add_contact(f"Client {i}", [f"+7916{i:07d}"], assigned_by_id=ops[0])
            emu.add_task(f"Call client {i}", ops[i % 2], group_id=int(group["ID"]), deadline=past,
                         crm=[f"C_{contact['ID']}"])
        settings = Path(tmp) / "settings.ini"
        settings.write_text(
            f"[bitrix24]\nwebhook_url = {emu.webhook_url}\n[calls]\ndefault_user = 101\n"
            f"[storage]\nstate_dir = {tmp}/state\n[logging]\nfile = {tmp}/log\n"
            f"[asterisk]\nami_port = {ami.port}\nami_user = {ami.username}\nami_secret = {ami.secret}\n"
            "[dialer]\nhours =\nhours_weekend =\n")  # nobody may be called now: scan only
        before = len(emu.requests)
        env = dict(os.environ, AGI_BITRIX_SETTINGS=str(settings))
        env.pop("AST_AGI_DIR", None)
        res = subprocess.run([str(ENTRY), "dialer", "run", "--once"], env=env, capture_output=True, text=True)
        http = [r for r in emu.requests[before:] if not r.get("batch")]
        scan = [r for r in http if r["method"] != "telephony.externalline.add"]
        print(f"dialer pass over {count} due tasks: {res.stdout.strip().splitlines()[0] if res.stdout else res.stderr}")
        print(f"  REST requests (HTTP) to scan them: {len(scan)}  (target <= 10 per 100 due tasks)")
        print(f"    {', '.join(r['method'] for r in scan)}")
        print(f"  503 QUERY_LIMIT_EXCEEDED answers at burst 50, 2 req/s: {emu.count_503}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
