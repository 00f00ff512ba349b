"""`agi-bitrix outbox flush|status|retry`: the call records kept while Bitrix24 was unreachable.

`flush` is safe from cron every minute, next to the worker and next to live calls: each call's
entries are leased by one deliverer at a time.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple

from agi_bitrix import settings as settings_mod
from agi_bitrix.admin_texts import Texts, choose_language
from agi_bitrix.commands.admin import CommandFailed

FLUSH_REQUEST_TIMEOUT = 10.0  # off the call path a request may wait longer than a ringing caller
PROGRESS_EVERY = 10.0         # seconds between the progress lines of a long flush
MAX_GROUPS = 12               # reasons listed one by one after a flush
PRUNE_EVERY = 300.0           # seconds between two prunings of the database by one deliverer


def open_outbox(args: Any, journal: bool = False) -> Tuple[Any, Any, Any]:
    """Settings, store and an Outbox for an admin command; CommandFailed(reason) when unusable.

    `journal`: on the shared store, the local journal instead (the worker opens the shared store
    on each pass, so it outlives an outage)."""
    from agi_bitrix import log as log_mod
    from agi_bitrix.bitrix.factory import NotConfigured, make_client
    from agi_bitrix.outbox import Outbox
    from agi_bitrix.store import StoreError
    from agi_bitrix.stores import open_store

    try:
        settings = settings_mod.load(getattr(args, "settings", None))
        if journal and settings.storage.url:
            from agi_bitrix.shared.journal import open_local

            store = open_local(settings.storage.state_dir, settings.storage.pbx_id)
        else:
            store = open_store(settings, timeout=max(settings.storage.db_timeout, 5.0))
        client = make_client(settings)
    except (settings_mod.SettingsError, StoreError, NotConfigured) as exc:
        raise CommandFailed(str(exc)) from None
    client.timeout = max(settings.bitrix24.timeout, FLUSH_REQUEST_TIMEOUT)
    logger = log_mod.configure(settings.logging.file, settings.logging.level, settings.secrets())
    return settings, Outbox(store, client, settings.calls.recording_url), logger


def close_abandoned(settings: Any, outbox: Any, logger: Any) -> int:
    """Queue the finish of calls whose hangup never ran (one warning line each); the flush that
    follows delivers them."""
    from agi_bitrix.abandoned import close_abandoned as close

    closed = close(outbox.store, settings, outbox.owner)
    for record in closed:
        logger.warning("call_closed_unfinished", **record)
    return len(closed)


class Every:
    """A long-running deliverer's pace for a chore: due() is true at most once per `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.last = seconds, float("-inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


def prune_history(settings: Any, store: Any, logger: Any) -> None:
    """Delete the history older than [storage] retention_days (never a call that may still be
    going on: at least [calls] max_call_length plus an hour), off the call path; one log line
    when anything went."""
    keep = max(settings.storage.retention_days * 86400.0, settings.calls.max_call_length + 3600.0)
    started = time.monotonic()
    try:
        counts = store.prune(keep, max(settings.calls.route_cache, 60.0))
    except Exception as exc:  # a busy or broken database: the next pass tries again
        logger.error("outbox_pruned", reason=f"{type(exc).__name__}: {exc}")
        return
    if any(counts.values()):
        logger.info("outbox_pruned", ms=int((time.monotonic() - started) * 1000),
                    retention_days=settings.storage.retention_days, **counts)


def _replay(outbox: Any, logger: Any, files: List[str]) -> None:
    """Journal what call steps could not (state_dir unwritable or full); the flush follows."""
    from agi_bitrix.spill import replay
    from agi_bitrix.store import StoreError

    if not files:
        raise CommandFailed("replay needs the file(s): the log and/or the spill file named in its lines")
    for path in files:
        try:
            open(path, "rb").close()
        except OSError as exc:
            raise CommandFailed(f"cannot read {path}: {exc.strerror}") from None
    try:
        calls, entries = replay(outbox.store, files)
    except StoreError as exc:
        raise CommandFailed(f"{exc}: fix the state folder first") from None
    logger.info("outbox_replay", files=files, calls=calls, journaled=entries)
    print(f"replayed {calls} call record(s), {entries} entr(y/ies) journaled (those replayed before are skipped)")


def _age(seconds: float, t: Texts) -> str:
    if seconds < 120:
        return t("{n} s", n=int(seconds))
    if seconds < 7200:
        return t("{n} min", n=int(seconds // 60))
    return t("{n} h", n=f"{seconds / 3600:.1f}")


def _kinds(kinds: Dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))


def status(outbox: Any, settings: Any, t: Texts) -> int:
    info = outbox.store.outbox_status()
    counts = info["counts"]
    print(t("waiting: {pending}   delivered: {done}   dead letters: {dead}", **counts))
    if info["oldest_pending"]:
        print(t("oldest waiting: {age} old", age=_age(time.time() - info["oldest_pending"], t)))
    if counts["pending"]:
        b24 = settings.bitrix24
        requests, seconds = outbox.estimate(info["pending_kinds"], b24.rate_per_second, b24.rate_burst)
        print(t("waiting by kind: {kinds}", kinds=_kinds(info["pending_kinds"])))
        print(t("delivering them takes about {time} once the portal answers ({requests} request(s) at "
                "{rate} per second after a burst of {burst})", time=_age(seconds, t), requests=requests,
                rate=f"{b24.rate_per_second:g}", burst=b24.rate_burst))
    if info["last_error"]:
        print(t("last error: {error}", error=info["last_error"]))
    for entry in outbox.store.entries(state="dead")[:20]:
        print(t("dead #{id} {kind} of call {linkedid}: {error}", id=entry.id, kind=entry.kind,
                linkedid=entry.linkedid, error=entry.last_error))
    if counts["dead"]:
        print(t("fix the cause, then: agi-bitrix outbox retry"))
    if getattr(outbox.store, "engine", "") == "postgresql":
        from agi_bitrix.shared.journal import open_local, waiting

        local = open_local(outbox.store.journal_dir, outbox.store.pbx)
        try:
            kept = len(waiting(local))
        finally:
            local.close()
        if kept:
            print(t("kept in the local journal for the shared store: {count} call(s)", count=kept))
    return 0


def _why(group: Dict[str, Any], stopped: str, t: Texts) -> str:
    """Why a group of entries still waits, in one phrase."""
    if group["why"] == "lease":
        from agi_bitrix.bitrix.ratelimit import hms
        from agi_bitrix.outbox import describe_owner

        return t("being delivered by another deliverer ({owner}) until {time}", owner=describe_owner(group["text"]),
                 time=hms(group["until"]))
    if group["why"] == "error":
        return t.translate(group["text"])
    if group["why"] == "behind":
        return t("behind an earlier entry of their call that waits")
    return t("not tried: the flush stopped early") if stopped else t("not tried yet")


def flush_report(stats: Any, t: Texts) -> List[str]:
    """What `outbox flush` prints: the totals, then what still waits and why, group by group."""
    lines = [t("delivered {delivered}, still waiting {waiting}, dead-lettered {dead} ({calls} call(s), "
               "{requests} request(s))", delivered=stats.delivered, waiting=stats.waiting, dead=stats.dead,
               calls=stats.calls, requests=stats.requests)]
    if stats.stopped:
        lines.append(t("stopped early, the portal failed a whole request: {reason}",
                       reason=t.translate(stats.stopped)))
    for group in stats.groups[:MAX_GROUPS]:
        lines.append(t("  {count} waiting ({kinds}): {reason}", count=group["count"], kinds=_kinds(group["kinds"]),
                       reason=_why(group, stats.stopped, t)))
    if len(stats.groups) > MAX_GROUPS:
        rest = sum(g["count"] for g in stats.groups[MAX_GROUPS:])
        lines.append(t("  {count} waiting for other reasons (agi-bitrix outbox status)", count=rest))
    if stats.waiting:
        lines.append(t("what waits goes out with the worker (or the service) or the next flush"))
    return lines


def run(args: Any) -> int:
    # A flush on the shared store opens it itself, and works from the local journal while it is away.
    settings, outbox, logger = open_outbox(args, journal=args.action == "flush")
    t = Texts(choose_language(getattr(args, "lang", None), settings.logging.language))
    try:
        if args.action == "status":
            return status(outbox, settings, t)
        if args.action == "retry":
            count = outbox.store.retry_dead()
            print(f"{count} dead letter(s) put back in line; they go out with the next flush")
            logger.info("outbox_retry", requeued=count)
            return 0
        if args.action == "replay":
            _replay(outbox, logger, list(getattr(args, "files", None) or []))
        elif getattr(args, "files", None):
            raise CommandFailed(f"{args.action} takes no files (only replay does)")
        started = time.monotonic()
        if settings.storage.url:
            from agi_bitrix.shared.deliver import shared_pass

            from agi_bitrix.store import StoreError

            try:
                stats = shared_pass(settings, outbox.client, logger, force=True)
            except StoreError as exc:  # e.g. another live PBX has this pbx_id
                raise CommandFailed(str(exc)) from None
            for note in stats.errors:
                print(note)
        else:
            abandoned = close_abandoned(settings, outbox, logger)
            if abandoned:
                print(f"closed {abandoned} call(s) whose hangup never ran (older than [calls] max_call_length)")
            shown = [started]

            def progress(so_far: Any) -> None:
                # A long backlog drains at the portal's pace: say how it goes every few seconds.
                if time.monotonic() - shown[0] >= PROGRESS_EVERY:
                    shown[0] = time.monotonic()
                    print(t("... delivered {delivered} so far", delivered=so_far.delivered), flush=True)

            stats = outbox.flush(progress=progress)
            prune_history(settings, outbox.store, logger)  # where cron flushes, nothing else prunes
        fields = dict(calls=stats.calls, delivered=stats.delivered, waiting=stats.waiting, dead=stats.dead,
                      requests=stats.requests, ms=int((time.monotonic() - started) * 1000))
        if stats.stopped:
            fields["stopped"] = stats.stopped
        fields.update({k: v[:20] for k, v in outbox.log.items() if k in ("delivery_errors", "dead_letters")})
        logger.info("outbox_flush", **fields)
        print("\n".join(flush_report(stats, t)))
        return 0
    finally:
        outbox.store.close()
