"""`agi-bitrix worker`: flush the outbox continuously (run it as a systemd service)."""
from __future__ import annotations

import signal
import sys
import time
from typing import Any, List

from agi_bitrix.commands.outbox import FLUSH_REQUEST_TIMEOUT, open_outbox


def run(args: Any) -> int:
    try:
        _settings, outbox, logger = open_outbox(args)
    except SystemExit as exc:
        print(f"agi-bitrix worker: {exc.code}", file=sys.stderr)
        return 1
    stopping: List[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    logger.info("worker_started", interval=args.interval)
    while not stopping:
        started = time.monotonic()
        try:
            stats = outbox.flush(per_call=FLUSH_REQUEST_TIMEOUT * 3, force=False)
            if stats.calls:
                logger.info("outbox_flush", calls=stats.calls, delivered=stats.delivered, waiting=stats.waiting,
                            dead=stats.dead, ms=int((time.monotonic() - started) * 1000),
                            **{k: outbox.log.pop(k) for k in ("delivery_errors", "dead_letters") if k in outbox.log})
        except Exception as exc:  # keep serving: one bad pass must not stop the delivery of calls
            logger.error("worker_pass_failed", reason=f"{type(exc).__name__}: {exc}")
        deadline = time.monotonic() + args.interval
        while not stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, args.interval))
    logger.info("worker_stopped")
    outbox.store.close()
    return 0
