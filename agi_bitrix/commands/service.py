"""`agi-bitrix service`: the long-lived service (FastAGI, outbox, events, HTTP, dialer) in one process.

Signals: SIGHUP re-reads the settings and reopens the log (`systemctl reload`, logrotate);
SIGTERM or SIGINT stops taking steps, lets the ones in flight finish, then exits 0.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, List

from agi_bitrix import settings as settings_mod
from agi_bitrix.commands.admin import CommandFailed


def run(args: Any) -> int:
    from agi_bitrix.service.core import ListenError, Service

    try:
        service = Service(getattr(args, "settings", None))
    except (settings_mod.SettingsError, ListenError) as exc:
        raise CommandFailed(str(exc)) from None
    wake = threading.Event()
    pending: List[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        pending.append(signum)
        wake.set()

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    service.start()
    host, port = service.fastagi.address[:2]
    print(f"FastAGI on {host}:{port}, HTTP on %s:%d" % service.web.server_address[:2], flush=True)
    while True:
        wake.wait()
        wake.clear()
        while pending:
            signum = pending.pop(0)
            if signum == signal.SIGHUP:
                service.reload()
            else:
                service.stop()
                return 0
