"""AGI mode: read the call step, route the event to its controller, always answer Asterisk.

Whatever happens (bad arguments, bad settings, Bitrix24 down, a bug) the process sets
BITRIX_STATUS, writes one log line with the call's linkedid, and exits 0 so the dialplan goes on.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import time
import traceback
from typing import Any, Dict, List, Optional

from agi_bitrix.agi import variables as V
from agi_bitrix.agi.session import AGISession
from agi_bitrix.controllers import EVENTS, Refused

MAX_ARGS = 8  # no event takes more; the rest is logged as ignored
FALLBACK_LOG = "/var/log/agi-bitrix/agi-bitrix.log"


class _Released(Exception):
    """This process gave Asterisk its step back and left the delivery to its child: exit now."""


def run(argv: List[str], early_hangups: List[bool], started: Optional[float] = None) -> int:
    started = time.monotonic() if started is None else started
    session = AGISession.from_stdio()
    signal.signal(signal.SIGHUP, session.on_sighup)
    if early_hangups:
        session.on_sighup()
    event = (argv[0] if argv else session.arg(1)).strip().lower()
    args = list(argv[1:])
    fields: Dict[str, Any] = {}
    if len(args) > MAX_ARGS:
        fields["ignored_args"] = len(args) - MAX_ARGS
        args = args[:MAX_ARGS]
    linkedid = ""
    status, call_id, responsible, reason = V.ERROR, "", None, ""
    logger = None
    released = False
    try:
        linkedid = _linkedid(session)
        fields["linkedid"] = linkedid
        from agi_bitrix import settings as settings_mod

        try:
            settings = settings_mod.load()
        except settings_mod.SettingsError as exc:
            logger = _fallback_logger()
            raise Refused(str(exc))
        from agi_bitrix import log as log_mod

        logger = log_mod.configure(settings.logging.file, settings.logging.level, settings.secrets())
        if event not in EVENTS:
            raise Refused(f"unknown event {event[:40]!r} (expected one of: {', '.join(EVENTS)})")
        if not linkedid:
            raise Refused("cannot read CHANNEL(linkedid) from Asterisk")
        outcome = _dispatch(event, args, session, settings, linkedid, fields, started)
        status, call_id, responsible, reason = outcome.status, outcome.call_id or "", outcome.responsible, outcome.reason
    except _Released:
        released = True  # the child logs the step once it has delivered
    except Refused as exc:
        reason = str(exc)
    except Exception as exc:  # a bug must still end in a safe dialplan outcome
        reason = f"internal error: {type(exc).__name__}: {exc}"
        fields["traceback"] = traceback.format_exc(limit=6)
    finally:
        if not released:
            _finish(session, logger, event, fields, status, call_id, responsible, reason, started)
    return 0


def _finish(session: AGISession, logger: Any, event: str, fields: Dict[str, Any], status: str, call_id: str,
            responsible: Optional[str], reason: str, started: float) -> None:
    """Publish the outcome (a no-op once the process left Asterisk) and write the step's one log line."""
    V.publish(session, status, call_id, responsible)
    fields.update(status=status, call_id=call_id or None, hung_up=session.hung_up,
                  ms=int((time.monotonic() - started) * 1000))
    if reason:
        fields["reason"] = reason
    if logger is None:
        logger = _fallback_logger()
    try:
        # The log line's `event` is the AGI event itself (cut and made printable if junk).
        name = "".join(ch for ch in event[:40] if ch.isprintable()) or "(none)"
        level = logger.error if status == V.ERROR else logger.warning if "state_problem" in fields else logger.info
        level(name, **fields)
    except Exception:
        pass


def _linkedid(session: AGISession) -> str:
    value = session.get_variable(V.LINKEDID) or session.env.get("agi_uniqueid", "")
    # linkedid is `[systemname-]epoch.seq` or an Originate ChannelId: keep it plain.
    cleaned = "".join(ch for ch in value if ch.isalnum() or ch in "._-:")[:150]
    return cleaned


def _dispatch(event: str, args: List[str], session: AGISession, settings: Any, linkedid: str,
              fields: Dict[str, Any], started: float) -> Any:
    from agi_bitrix.bitrix.factory import NotConfigured, make_client
    from agi_bitrix.deadline import Deadline
    from agi_bitrix.store import Store, StoreError

    try:
        client = make_client(settings)
    except NotConfigured as exc:
        raise Refused(str(exc))
    deadline = Deadline(settings.bitrix24.timeout, started)
    controller = importlib.import_module(EVENTS[event])
    try:
        try:
            store = Store(settings.storage.state_dir)
        except StoreError as exc:
            return _without_journal(controller, event, args, session, settings, linkedid, fields, client,
                                    deadline, str(exc))
        ctx = _context(event, args, session, settings, store, client, deadline, linkedid, fields)
        try:
            return _handle(controller, ctx, started)
        except StoreError as exc:
            if "released_ms" in fields:  # a delivering child: the step was journaled and answered
                raise Refused(f"{exc}; delivery left to the worker")
            problem = str(exc)
        finally:
            ctx.store.close()
        # The journal failed midway: the step starts over in memory from what the journal holds.
        return _without_journal(controller, event, args, session, settings, linkedid, fields, client, deadline,
                                problem)
    finally:
        fields["requests"] = client.requests_made


def _context(event: str, args: List[str], session: AGISession, settings: Any, store: Any, client: Any,
             deadline: Any, linkedid: str, fields: Dict[str, Any]) -> Any:
    from agi_bitrix.controllers.base import EventContext
    from agi_bitrix.outbox import Outbox

    return EventContext(event=event, args=args, session=session, settings=settings, store=store,
                        outbox=Outbox(store, client, settings.calls.recording_url, log=fields),
                        deadline=deadline, linkedid=linkedid, log=fields)


def _handle(controller: Any, ctx: Any, started: float, in_memory: bool = False) -> Any:
    """Run the controller and deliver (in a child, for a step that must not hold the call)."""
    outcome = controller.handle(ctx)
    if outcome.status == V.ERROR:
        return outcome
    if getattr(controller, "DELIVER_AFTER_RETURN", False):
        _release(ctx, outcome, started, in_memory)
    return ctx.settle(outcome)


def _without_journal(controller: Any, event: str, args: List[str], session: AGISession, settings: Any,
                     linkedid: str, fields: Dict[str, Any], client: Any, deadline: Any, problem: str) -> Any:
    """state_dir cannot be written: deliver directly within the budget; what could not be
    delivered goes whole into this step's log line and a spill file, for `outbox replay`."""
    from agi_bitrix.spill import MemoryState

    fields["state_problem"] = problem
    state = MemoryState(settings.storage.state_dir, settings.logging.file, linkedid)
    if state.notes:
        fields["state_notes"] = state.notes
    released = False
    try:
        outcome = _handle(controller, _context(event, args, session, settings, state.store, client, deadline,
                                               linkedid, fields), deadline.started, in_memory=True)
        if state.blind and state.store.call(state.store.active_key(linkedid)) is None:
            # Not "nothing to do": the call may well be in the database nobody can read.
            outcome.status, outcome.reason = V.ERROR, f"{problem}; the call's state cannot be read either"
    except _Released:
        released = True  # the child delivers and spills what is left
        raise
    finally:
        if not released:
            _spill(state, fields)
    if outcome.status == V.QUEUED:
        kept = "this log line" if "spill_problem" in fields else f"this log line and {state.spill_file}"
        outcome.status = V.ERROR
        outcome.reason = (f"{problem}; not delivered, kept in {kept}: fix it, then run "
                          "agi-bitrix outbox replay with that file")
    return outcome


def _spill(state: Any, fields: Dict[str, Any]) -> None:
    try:
        records = state.leftovers()
        if records:
            fields["undelivered"] = records
            trouble = state.spill(records)
            fields.update({"spill_problem": trouble} if trouble else {"spill_file": str(state.spill_file)})
    finally:
        state.close()


def _release(ctx: Any, outcome: Any, started: float, in_memory: bool = False) -> None:
    """Give Asterisk the step's status from the journal alone, then deliver in a child process.

    Returns in the child (with a store, outbox and budget of its own); raises _Released in the
    parent. Without a fork the journal keeps the entries for the next step or the worker; with
    nothing to deliver there is no fork at all. `in_memory`: the step's state lives in this
    process only (state_dir unwritable): the child keeps it, and without a fork the step
    delivers within its own budget.
    """
    from agi_bitrix import background
    from agi_bitrix.deadline import Deadline
    from agi_bitrix.outbox import Outbox
    from agi_bitrix.store import PENDING, Store

    if not any(ctx.store.entries(key, PENDING) for key in ctx.keys or [ctx.linkedid]):
        return  # nothing to deliver: settling needs no network
    ctx.publish(ctx.settle(dataclasses.replace(outcome), deliver=False))
    ctx.log["released_ms"] = int((time.monotonic() - started) * 1000)
    if not in_memory:
        ctx.store.close()  # a SQLite connection to a file must not cross a fork
    try:
        in_child = background.detach()
    except OSError as exc:
        if in_memory:
            return  # nowhere to leave it: deliver now, within the step's budget
        ctx.log["delivery_note"] = f"cannot fork ({exc.strerror}): left in the outbox"
        budget = 0.0
    else:
        if not in_child:
            raise _Released()
        ctx.session.detach()
        budget = ctx.settings.bitrix24.timeout  # its own budget, off the call's path
    ctx.deadline = Deadline(budget)
    if in_memory:
        return
    ctx.store = Store(ctx.settings.storage.state_dir)
    ctx.outbox = Outbox(ctx.store, ctx.outbox.client, ctx.settings.calls.recording_url, ctx.outbox.owner, ctx.log)


def _fallback_logger() -> Any:
    from agi_bitrix import log as log_mod

    return log_mod.configure(os.environ.get("AGI_BITRIX_LOGGING_FILE") or FALLBACK_LOG)
