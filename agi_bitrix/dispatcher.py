"""A call step: read it, route the event to its controller, always answer Asterisk.

A step ends here, in one place: the controller returns what it did (entries journaled, keys to
deliver, variables for the dialplan, a Dial to run), and this module alone delivers, settles the
status and talks to the channel, once, the same way for both transports.

The same code serves both transports: process mode (`AGI(agi-bitrix,EVENT,...)`, the session on
stdin/stdout, one process per step) and FastAGI (`agi-bitrix service`, the session on a socket,
one thread per step). What differs between them (where settings, the log, the Bitrix24 client
and the store come from, how a step gives Asterisk its answer before it delivers) is behind a
small host object.

Whatever happens (bad arguments, bad settings, Bitrix24 down, a bug) the step sets
BITRIX_STATUS, writes one log line with the call's linkedid, and returns so the dialplan goes on.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Tuple

from agi_bitrix.agi import variables as V
from agi_bitrix.agi.session import AGISession
from agi_bitrix.controllers import EVENTS, Refused

MAX_ARGS = 8  # no event takes more; the rest is logged as ignored
FALLBACK_LOG = "/var/log/agi-bitrix/agi-bitrix.log"


class Released(Exception):
    """This process gave Asterisk its step back and left the delivery to its child: exit now."""


class StepHost(Protocol):
    """What a transport provides to a call step."""

    def load_settings(self) -> Any:
        """The settings in force; raises Refused (with a logger ready) when they are unusable."""

    def logger(self) -> Any:
        """The structured logger (a fallback one when the settings could not be read)."""

    def client(self, settings: Any) -> Any:
        """The Bitrix24 client for this step; raises Refused when none is configured."""

    def store(self, settings: Any) -> Any:
        """The journal for this step; raises StoreError when state_dir cannot be used."""

    def close(self, store: Any) -> None:
        """The step is done with its store."""

    def release(self, ctx: Any, in_memory: bool) -> Optional[float]:
        """Give Asterisk the step back now (its status is already published) and return the budget
        the delivery still has (None: the step's own); raises Released where this process must
        stop (its child goes on). `in_memory`: the step's state is not in the database."""

    def outbox_owner(self) -> Optional[str]:
        """Whose lease the step's journal entries carry (None: the step's own)."""

    def deliver(self, ctx: Any, keys: List[str]) -> None:
        """Deliver what waits for these calls within the step's budget (`ctx.deadline`)."""


@dataclass
class StepResult:
    status: str
    call_id: str = ""
    fields: Dict[str, Any] = field(default_factory=dict)


def run(argv: List[str], early_hangups: List[bool], started: Optional[float] = None) -> int:
    """Process mode: one step on stdin/stdout, then the process ends."""
    started = time.monotonic() if started is None else started
    session = AGISession.from_stdio()
    signal.signal(signal.SIGHUP, session.on_sighup)
    if early_hangups:
        session.on_sighup()
    event = argv[0] if argv else session.arg(1)
    serve(session, event, list(argv[1:]), started, ProcessHost())
    return 0


def network_request(session: AGISession) -> Tuple[str, List[str]]:
    """FastAGI: the event from `agi_network_script` (query string dropped), the args from agi_arg_N."""
    script = session.env.get("agi_network_script", "")
    event = script.split("?", 1)[0].strip("/")
    args: List[str] = []
    while f"agi_arg_{len(args) + 1}" in session.env and len(args) < 128:  # Asterisk's MAX_ARGS
        args.append(session.env[f"agi_arg_{len(args) + 1}"])
    return event, args


def serve(session: AGISession, event: str, args: List[str], started: float, host: StepHost) -> StepResult:
    event = event.strip().lower()
    fields: Dict[str, Any] = {}
    if session.network:
        fields["transport"] = "fastagi"
    if len(args) > MAX_ARGS:
        fields["ignored_args"] = len(args) - MAX_ARGS
        args = args[:MAX_ARGS]
    status, call_id, responsible, reason = V.ERROR, "", None, ""
    variables: Dict[str, str] = {}
    dial: Optional[str] = None
    released = False
    try:
        linkedid = _linkedid(session)
        fields["linkedid"] = linkedid
        settings = host.load_settings()
        if event not in EVENTS:
            raise Refused(f"unknown event {event[:40]!r} (expected one of: {', '.join(EVENTS)})")
        if not linkedid:
            raise Refused("cannot read CHANNEL(linkedid) from Asterisk")
        outcome = _dispatch(event, args, session, settings, linkedid, fields, started, host)
        status, call_id, responsible, reason = outcome.status, outcome.call_id or "", outcome.responsible, outcome.reason
        variables, dial = outcome.variables, outcome.dial
    except Released:
        released = True  # the child logs the step once it has delivered
    except Refused as exc:
        reason, variables = str(exc), exc.variables
    except Exception as exc:  # a bug must still end in a safe dialplan outcome
        reason = f"internal error: {type(exc).__name__}: {exc}"
        import traceback  # only here: it pulls in textwrap and friends

        fields["traceback"] = traceback.format_exc(limit=6)
    finally:
        if not released:
            _publish(session, status, call_id, responsible, variables)
            if dial is not None:
                _dial(session, dial, fields)
            _log(session, host, event, fields, status, call_id, reason, started)
    return StepResult(status, call_id, fields)


def _publish(session: AGISession, status: str, call_id: str, responsible: Optional[str],
             variables: Dict[str, str]) -> None:
    """The channel variables of the step (a no-op once the step left Asterisk)."""
    for name, value in variables.items():
        session.set_variable(name, value)
    V.publish(session, status, call_id, responsible)


def _dial(session: AGISession, options: str, fields: Dict[str, Any]) -> None:
    """Dial after the status is on the channel: it blocks until the call ends, and the hangup
    handler needs BITRIX_CALL_ID before that."""
    result = session.exec_app("Dial", options)
    fields.update(dial_result=result, dialstatus=session.get_variable("DIALSTATUS"))


def _log(session: AGISession, host: StepHost, event: str, fields: Dict[str, Any], status: str, call_id: str,
         reason: str, started: float) -> None:
    """The step's one log line."""
    fields.update(status=status, call_id=call_id or None, hung_up=session.hung_up,
                  ms=int((time.monotonic() - started) * 1000))
    if reason:
        fields["reason"] = reason
    try:
        # The log line's `event` is the AGI event itself (cut and made printable if junk).
        name = "".join(ch for ch in event[:40] if ch.isprintable()) or "(none)"
        logger = host.logger()
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
              fields: Dict[str, Any], started: float, host: StepHost) -> Any:
    from agi_bitrix.deadline import Deadline
    from agi_bitrix.store import StoreError

    client = host.client(settings)
    deadline = Deadline(settings.bitrix24.timeout, started)
    controller = importlib.import_module(EVENTS[event])
    try:
        try:
            away = _found_away(client, started) if settings.storage.url else ""
            if away:  # reading the token pair found PostgreSQL away a moment ago: do not wait on it twice
                raise StoreError(away)
            store = host.store(settings)
        except StoreError as exc:
            if settings.storage.url:
                return _on_journal(controller, event, args, session, settings, linkedid, fields, client,
                                   deadline, str(exc), host)
            return _without_journal(controller, event, args, session, settings, linkedid, fields, client,
                                    deadline, str(exc), host)
        if getattr(store, "engine", "") == "postgresql":
            _catch_up(store, settings, linkedid, fields)
            if hasattr(client.limiter, "borrow"):
                client.limiter.borrow(store.db)  # the shared budget's row through the step's connection
        ctx = _context(event, args, session, settings, store, client, deadline, linkedid, fields,
                       host.outbox_owner())
        try:
            return _handle(controller, ctx, started, host)
        except StoreError as exc:
            if "released_ms" in fields:  # a delivering child: the step was journaled and answered
                raise Refused(f"{exc}; delivery left to the worker")
            problem = str(exc)
        finally:
            host.close(ctx.store)
        if settings.storage.url:
            # The shared store failed midway: the step starts over on the local journal.
            return _on_journal(controller, event, args, session, settings, linkedid, fields, client, deadline,
                               problem, host)
        # The journal failed midway: the step starts over in memory from what the journal holds.
        return _without_journal(controller, event, args, session, settings, linkedid, fields, client, deadline,
                                problem, host)
    finally:
        fields["requests"] = client.requests_made
        if client.requests_made:
            fields["portal_ms"] = int(client.portal_seconds * 1000)


def _found_away(client: Any, started: float) -> str:
    """Why the shared store failed the token pair's reading in this step ('' if it did not)."""
    tokens = getattr(client.auth, "store", None)
    return getattr(tokens, "problem", "") if getattr(tokens, "failed_at", float("-inf")) >= started else ""


def _catch_up(store: Any, settings: Any, linkedid: str, fields: Dict[str, Any]) -> None:
    """What the local journal kept of this call during an outage reaches the shared store before
    the step reads it there (an answer recorded meanwhile decides the hangup's status)."""
    from agi_bitrix.shared import journal
    from agi_bitrix.store import StoreError

    try:
        moved = journal.catch_up(store, settings.storage.state_dir, linkedid)
    except StoreError as exc:  # the deliverer moves it later; the step goes on
        fields["journal_problem"] = str(exc)
        return
    if moved:
        fields["journal_moved"] = moved


def _on_journal(controller: Any, event: str, args: List[str], session: AGISession, settings: Any,
                linkedid: str, fields: Dict[str, Any], client: Any, deadline: Any, problem: str,
                host: StepHost) -> Any:
    """The shared store (PostgreSQL) cannot be used now: the step runs on the PBX's local journal,
    as a PBX without PostgreSQL does, and notes the calls it changed; the deliverer moves them to
    the shared store when it is back (shared/journal.py)."""
    from agi_bitrix.shared import journal
    from agi_bitrix.store import StoreError

    fields["shared_store_problem"] = problem
    if hasattr(client.limiter, "store_away"):
        client.limiter.store_away(problem)  # the step's requests draw on this PBX's share, no new attempt
    try:
        store = journal.open_local(settings.storage.state_dir, settings.storage.pbx_id)
    except StoreError as exc:
        return _without_journal(controller, event, args, session, settings, linkedid, fields, client, deadline,
                                f"{problem}; {exc}", host)
    ctx = _context(event, args, session, settings, store, client, deadline, linkedid, fields)
    ctx.journal_only = True
    outcome = None
    try:
        outcome = _handle(controller, ctx, deadline.started, host)
        return outcome
    finally:
        keys = {linkedid, *(outcome.deliver if outcome is not None else [])}
        try:
            local = journal.open_local(settings.storage.state_dir, settings.storage.pbx_id)
            try:
                journal.note_unsynced(local, keys | {local.active_key(linkedid)})
            finally:
                local.close()
        except StoreError as exc:
            fields["journal_problem"] = str(exc)
        ctx.store.close()


def _context(event: str, args: List[str], session: AGISession, settings: Any, store: Any, client: Any,
             deadline: Any, linkedid: str, fields: Dict[str, Any], owner: Optional[str] = None) -> Any:
    from agi_bitrix.controllers.base import EventContext
    from agi_bitrix.outbox import Outbox

    return EventContext(event=event, args=args, session=session, settings=settings, store=store,
                        outbox=Outbox(store, client, settings.calls.recording_url, owner, log=fields),
                        deadline=deadline, linkedid=linkedid, log=fields)


def _handle(controller: Any, ctx: Any, started: float, host: StepHost, in_memory: bool = False) -> Any:
    """Run the controller, then deliver and settle (after answering Asterisk, for a step that
    must not hold the call)."""
    outcome = controller.handle(ctx)
    if outcome.status == V.ERROR:
        return outcome
    if getattr(controller, "DELIVER_AFTER_RETURN", False):
        _release(ctx, outcome, started, host, in_memory)
    return settle(ctx, outcome, host)


def _without_journal(controller: Any, event: str, args: List[str], session: AGISession, settings: Any,
                     linkedid: str, fields: Dict[str, Any], client: Any, deadline: Any, problem: str,
                     host: StepHost) -> Any:
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
                                               linkedid, fields), deadline.started, host, in_memory=True)
        if state.blind and state.store.call(state.store.active_key(linkedid)) is None:
            # Not "nothing to do": the call may well be in the database nobody can read.
            outcome.status, outcome.reason = V.ERROR, f"{problem}; the call's state cannot be read either"
    except Released:
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


def _release(ctx: Any, outcome: Any, started: float, host: StepHost, in_memory: bool = False) -> None:
    """Give Asterisk the step's status from the journal alone, then deliver off the call's path.

    With nothing to deliver there is nothing to release: settling needs no network.
    """
    from agi_bitrix.deadline import Deadline
    from agi_bitrix.store import PENDING

    if not any(ctx.store.entries(key, PENDING) for key in outcome.deliver or [ctx.linkedid]):
        return
    early = settle(ctx, dataclasses.replace(outcome))
    _publish(ctx.session, early.status, early.call_id or "", early.responsible, early.variables)
    ctx.log["released_ms"] = int((time.monotonic() - started) * 1000)
    budget = host.release(ctx, in_memory)
    if budget is not None:
        ctx.deadline = Deadline(budget)


def settle(ctx: Any, outcome: Any, host: Optional[StepHost] = None) -> Any:
    """Deliver what is due for this call within the budget (by the host); the status from this
    step's entries.

    OK: everything the step journaled reached Bitrix24. QUEUED: kept in the outbox for later
    delivery. ERROR: an entry was dead-lettered (reason in the log). Without a host it only reads
    the journal (no network): the status of a step that delivers after giving Asterisk its answer.
    """
    from agi_bitrix.store import DEAD, PENDING

    if host is not None:
        host.deliver(ctx, outcome.deliver or [ctx.linkedid])
    entries = ctx.store.entry_states(outcome.queued)
    call = ctx.store.call(ctx.store.active_key(ctx.linkedid))
    outcome.call_id = call.call_id if call else None
    dead = [e for e in entries.values() if e.state == DEAD]
    if dead:
        outcome.status, outcome.reason = V.ERROR, f"{dead[0].kind} dead-lettered: {dead[0].last_error}"
    elif any(e.state == PENDING for e in entries.values()) or (call is not None and not call.call_id):
        outcome.status = V.QUEUED
        waiting = [e for e in entries.values() if e.state == PENDING and e.last_error]
        if waiting:
            outcome.reason = f"kept in the outbox: {waiting[0].last_error}"
    if outcome.status == V.QUEUED:
        ctx.log["queued"] = sorted(e.kind for e in entries.values() if e.state == PENDING)
    return outcome


class ProcessHost:
    """Process mode: settings read and the log opened for this one step."""

    def __init__(self) -> None:
        self._logger: Any = None

    def load_settings(self) -> Any:
        from agi_bitrix import log as log_mod
        from agi_bitrix import settings_file

        try:
            settings = settings_file.load_for_step()
        except settings_file.SettingsError as exc:
            raise Refused(str(exc))
        self._logger = log_mod.configure(settings.logging.file, settings.logging.level, settings.secrets())
        return settings

    def logger(self) -> Any:
        if self._logger is None:
            from agi_bitrix import log as log_mod

            self._logger = log_mod.configure(os.environ.get("AGI_BITRIX_LOGGING_FILE") or FALLBACK_LOG)
        return self._logger

    def client(self, settings: Any) -> Any:
        from agi_bitrix.bitrix.factory import NotConfigured, make_client
        from agi_bitrix.bitrix.http import Direct

        try:
            return make_client(settings, http=Direct())  # one process, one or two requests: no pool
        except NotConfigured as exc:
            raise Refused(str(exc))

    def store(self, settings: Any) -> Any:
        from agi_bitrix.stores import open_store

        return open_store(settings)

    def close(self, store: Any) -> None:
        store.close()

    def outbox_owner(self) -> Optional[str]:
        return None

    def deliver(self, ctx: Any, keys: List[str]) -> None:
        """The step's own calls, inline: other processes' calls cannot share its requests."""
        ctx.outbox.deliver_keys(keys, ctx.deadline, lease=ctx.lease)

    def release(self, ctx: Any, in_memory: bool) -> Optional[float]:
        """Asterisk waits for the AGI process itself (background.py): fork, the parent exits.

        In the child, with a store, outbox and budget of its own. Without a fork the journal
        keeps the entries for the next step or the worker. `in_memory` (state_dir unwritable):
        the child keeps the state it has; without a fork the step delivers within its budget.
        """
        from agi_bitrix import background
        from agi_bitrix.outbox import Outbox

        if not in_memory:
            ctx.store.close()  # a connection (SQLite file, PostgreSQL socket) must not cross a fork
        try:
            in_child = background.detach()
        except OSError as exc:
            if in_memory:
                return None  # nowhere to leave it: deliver now, within the step's budget
            ctx.log["delivery_note"] = f"cannot fork ({exc.strerror}): left in the outbox"
            budget = 0.0
        else:
            if not in_child:
                raise Released()
            ctx.session.detach()
            budget = ctx.settings.bitrix24.timeout  # its own budget, off the call's path
        if not in_memory:
            ctx.store = _reopen(ctx)
            ctx.outbox = Outbox(ctx.store, ctx.outbox.client, ctx.settings.calls.recording_url, ctx.outbox.owner,
                                ctx.log)
        return budget


def _reopen(ctx: Any) -> Any:
    """The step's store again, in a delivering child, on the engine the step ran on (StoreError
    when the shared store went meanwhile: its entries wait there for the deliverer)."""
    from agi_bitrix.store import Store

    settings = ctx.settings
    if not settings.storage.url:
        return Store(settings.storage.state_dir)
    if ctx.journal_only:
        from agi_bitrix.shared import journal

        return journal.open_local(settings.storage.state_dir, settings.storage.pbx_id)
    from agi_bitrix.stores import open_store

    return open_store(settings)
