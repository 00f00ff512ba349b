"""`agi-bitrix worker`: flush the outbox continuously (run it as a systemd service)."""
from __future__ import annotations

import signal
import time
from typing import Any, Callable, List, Optional

from agi_bitrix.commands.outbox import PRUNE_EVERY, Every, close_abandoned, open_outbox, prune_history


def run(args: Any) -> int:
    settings, outbox, logger = open_outbox(args, journal=True)
    stopping: List[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    logger.info("worker_started", interval=args.interval)
    poller = event_poller(settings, outbox, logger)
    pruning = Every(PRUNE_EVERY)
    while not stopping:
        prune = pruning.due()
        one_pass(settings, outbox, logger, poller, prune)
        if prune:
            prune_history(settings, outbox.store, logger)
        deadline = time.monotonic() + args.interval
        while not stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, args.interval))
    logger.info("worker_stopped")
    outbox.store.close()
    return 0


def one_chores(settings: Any, outbox: Any, logger: Any, poller: Optional[Callable[[], None]]) -> None:
    """What a deliverer does before each pass: offline events, calls whose hangup never ran."""
    if poller is not None:
        poller()
    try:
        if not settings.storage.url:  # on the shared store its pass closes them (shared/deliver.py)
            close_abandoned(settings, outbox, logger)
    except Exception as exc:  # keep serving: one bad pass must not stop the delivery of calls
        logger.error("worker_pass_failed", reason=f"{type(exc).__name__}: {exc}")


def one_pass(settings: Any, outbox: Any, logger: Any, poller: Optional[Callable[[], None]],
             prune: bool = False) -> None:
    """One pass of the worker: its chores, then what is due, in full batches. `prune`: on the
    shared store the pass prunes every PBX's history too (the caller prunes its own store)."""
    started = time.monotonic()
    one_chores(settings, outbox, logger, poller)
    try:
        if settings.storage.url:
            from agi_bitrix.shared.deliver import shared_pass

            stats = shared_pass(settings, outbox.client, logger, owner=outbox.owner, prune=prune)
        else:
            stats = outbox.flush(force=False)
        if stats.calls:
            logger.info("outbox_flush", calls=stats.calls, delivered=stats.delivered, waiting=stats.waiting,
                        dead=stats.dead, ms=int((time.monotonic() - started) * 1000),
                        **{k: outbox.log.pop(k) for k in ("delivery_errors", "dead_letters") if k in outbox.log})
    except Exception as exc:  # keep serving: one bad pass must not stop the delivery of calls
        logger.error("worker_pass_failed", reason=f"{type(exc).__name__}: {exc}")


def event_poller(settings: Any, outbox: Any, logger: Any, ami: Any = None) -> Optional[Callable[[], None]]:
    """OAuth mode: click-to-call calls left half set up are finished, and offline events (click-to-call
    without a public URL) are polled, on every pass."""
    if settings.bitrix24.mode != "oauth":
        return None
    from agi_bitrix.commands.serve import SharedAMI
    from agi_bitrix.events import EventProcessor, poll_offline, sweep_stale

    ami = ami or SharedAMI(settings)

    def poll() -> None:
        from agi_bitrix.stores import open_store

        fields: dict = {}
        store = outbox.store
        try:
            if settings.storage.url:  # click-to-call calls live in the shared store (while it is away the
                store = open_store(settings)  # events wait at the portal)
            processor = EventProcessor(settings, store, outbox.client, ami, fields)
            stale = sweep_stale(processor)
            if stale:
                logger.warning("stale_clicks_finished", count=stale, **fields)
            if settings.events.delivery != "offline":
                return
            count, outcomes = poll_offline(outbox.client, processor)
            if count:
                logger.info("offline_events", count=count, outcomes=outcomes, **fields)
        except Exception as exc:  # the portal may be down; the events wait there
            logger.error("offline_events", reason=f"{type(exc).__name__}: {exc}", **fields)
        finally:
            if store is not outbox.store:
                store.close()

    return poll
