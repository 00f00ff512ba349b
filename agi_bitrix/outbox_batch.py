"""One delivery round's request: which waiting entries go, as which commands, and what the
portal's answer to each command means for its entry.

The entries of several calls go as one `batch` of at most 50 commands, each call's in its order
(register -> card moves -> finish -> recording -> other writes). A command that needs the CALL_ID
of a register sent in the same request refers to it as `$result[rN][CALL_ID]`; an employee's
user id not cached yet is looked up in the same request (`$result[u101][0][ID]`). Sub-requests of
a batch run one after the other and a failed one does not stop the others (Bitrix24 REST docs:
batch, halt=0), so every entry is settled by its own command's answer:

- answered: delivered (a finish answered "Call is not found" after an attempt that may have
  reached the portal was finished by that attempt);
- refused for good: dead letter; refused by a limit, an auth or a scope problem: retried, and a
  429 holds that method back for every deliverer until the portal frees it;
- no answer for it (a truncated or odd answer, the whole request failed): retried, marked as
  maybe sent when the request may have reached the portal;
- it used the result of a command that failed (its register), or an earlier entry of its call
  failed in the same request: retried, never dead-lettered for a failure that was not its own.

A recording sent inline (FILE_CONTENT or the two-step upload) cannot go through batch (Bitrix24
REST docs: batch, files) and goes on its own after the batch, once its call is finished.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

from agi_bitrix.bitrix import payloads
from agi_bitrix.bitrix.client import BATCH_MAX
from agi_bitrix.bitrix.ratelimit import hms
from agi_bitrix.bitrix.errors import (AuthError, BitrixError, LimitError, NetworkError, NotFoundError,
                                      ScopeError)
from agi_bitrix.store import DEAD, DONE, PENDING, Call, Entry, Mark, Store

SETTLE_SECONDS = 2.0      # a recording is complete once it stopped changing this long
MISSING_GRACE = 600.0     # how long a recording may take to appear before it is given up
MAX_BACKOFF = 600.0
WAIT_AGAIN = 5.0          # an entry that waits for something outside this round looks again after this


def backoff(attempts: int) -> float:
    return min(MAX_BACKOFF, 5.0 * 2 ** max(0, attempts - 1))


def may_have_reached(exc: BitrixError) -> bool:
    """A timeout or a 5xx: the portal may have done the work and only its answer was lost (a
    gateway's 502/504, a 503 that is no rate limit). A refused connection never reached it."""
    return isinstance(exc, NetworkError) and (exc.code == "TIMEOUT" or (exc.status or 0) >= 500)


def retryable(exc: BitrixError) -> bool:
    """What may heal: network, limits, auth and scopes an administrator fixes."""
    return isinstance(exc, (NetworkError, LimitError, AuthError, ScopeError)) or exc.retryable


@dataclass
class Planned:
    """An entry that goes in this request, with the commands that carry it."""
    entry: Entry
    keys: List[str]                        # its own commands
    users: List[str] = field(default_factory=list)  # the look-ups of employees it needs
    ref: Optional[str] = None              # the register command of this request whose CALL_ID it uses
    params: Dict[str, Any] = field(default_factory=dict)  # the register's params as sent


@dataclass
class CallState:
    """What one call's later entries need to know while its chain is planned."""
    call: Optional[Call]
    call_id: Optional[str]                 # known, or a `$result[...]` reference
    register_key: Optional[str] = None     # this request registers the call
    finish_key: Optional[str] = None       # this request finishes the call
    card_live: bool = True
    sending: bool = False                  # an earlier entry of the call goes in this request

    @property
    def finished(self) -> bool:
        return self.call is not None and self.call.finished_at is not None


@dataclass
class Plan:
    commands: Dict[str, Tuple[str, Dict[str, Any]]] = field(default_factory=dict)
    planned: List[Planned] = field(default_factory=list)
    settled: List[Mark] = field(default_factory=list)     # decided without a request
    inline: List[Tuple[Entry, CallState]] = field(default_factory=list)  # recordings after the batch
    lookups: Dict[str, str] = field(default_factory=dict)  # inner number -> command key
    registering: Set[str] = field(default_factory=set)     # calls this request registers
    not_live: List[str] = field(default_factory=list)      # calls registered after they ended: no card
    size: int = BATCH_MAX                                  # commands it may hold

    def room(self) -> int:
        return self.size - len(self.commands)


class Answers:
    """The answer to each command of a request, by key."""

    def __init__(self, results: Dict[str, Any], errors: Dict[str, BitrixError],
                 failed: Optional[BitrixError] = None) -> None:
        self.results = results
        self.errors = errors
        self.failed = failed  # the whole request failed: nothing is known of any command
        # Commands whose error may have come after the portal did the work: a plain request cut
        # by a timeout or a 5xx, a command the portal itself failed inside a batch.
        self.maybe_ran = {key for key, exc in errors.items() if may_have_reached(exc)}

    def of(self, key: str) -> Tuple[str, Any]:
        """("ok", result), ("error", BitrixError) or ("unknown", None)."""
        if self.failed is not None:
            return "unknown", None
        if key in self.errors:
            return "error", self.errors[key]
        if key in self.results:
            return "ok", self.results[key]
        return "unknown", None


class Planner:
    """Turns leased entries into one request and its answers into marks (see the module doc)."""

    def __init__(self, store: Store, recording_url: str, log: Dict[str, Any],
                 blocked: Optional[Dict[str, float]] = None, now: Optional[float] = None) -> None:
        self.store = store
        self.recording_url = recording_url
        self.log = log
        self.blocked = {k.lower(): v for k, v in (blocked or {}).items()}  # method -> held back until
        self.now = time.time() if now is None else now  # the deliverer's clock: when to try again

    # -- planning --------------------------------------------------------------------------------
    def plan(self, entries: List[Entry], size: int = BATCH_MAX) -> Plan:
        plan = Plan(size=size)
        chains: Dict[str, List[Entry]] = {}
        for entry in entries:
            chains.setdefault(entry.linkedid, []).append(entry)
        for key, chain in chains.items():
            call = self.store.call(key)
            state = CallState(call, call.call_id if call else None, card_live=bool(call.card_live) if call else True)
            for entry in chain:
                if plan.room() <= 0:
                    break
                went = self._plan_entry(entry, state, plan)
                if went != "send" and went != "done":
                    break  # the call's later entries wait behind this one
                state.sending = state.sending or went == "send"
        return plan

    def _plan_entry(self, entry: Entry, state: CallState, plan: Plan) -> str:
        handler = getattr(self, f"_plan_{entry.kind}", None)
        if handler is None:
            plan.settled.append(Mark(entry, DEAD, f"unknown entry kind {entry.kind!r}"))
            return "dead"
        if entry.kind != "register" and not state.call_id and entry.kind != "rest":
            return self._waits_for_register(entry, plan)
        return handler(entry, state, plan)

    def _add(self, plan: Plan, planned: Planned, commands: List[Tuple[str, str, Dict[str, Any]]],
             lookups: List[str]) -> str:
        """Put an entry's commands in the request if they fit (with the look-ups it needs)."""
        for key, method, params in commands:
            blocked = self.blocked.get(method.lower(), 0.0)
            if blocked > self.now:
                plan.settled.append(Mark(planned.entry, PENDING, f"{method}: held back until "
                                         f"{hms(blocked)} (the portal's execution-time limit for it)",
                                         next_try=blocked, attempted=False))
                return "wait"
        new_lookups = [inner for inner in lookups if inner not in plan.lookups]
        if len(commands) + len(new_lookups) > plan.room():
            if not plan.commands and plan.size >= BATCH_MAX:  # it would never fit
                plan.settled.append(Mark(planned.entry, DEAD, f"needs {len(commands) + len(new_lookups)} "
                                         f"commands, more than one request holds ({BATCH_MAX})"))
                return "dead"
            return "full"
        for inner in new_lookups:
            key = f"u{inner}"
            plan.lookups[inner] = key
            plan.commands[key] = ("user.get", {"FILTER": {"UF_PHONE_INNER": inner, "ACTIVE": "true"}})
        for key, method, params in commands:
            plan.commands[key] = (method, params)
        planned.users = [plan.lookups[inner] for inner in lookups]
        plan.planned.append(planned)
        return "send"

    def _waits_for_register(self, entry: Entry, plan: Plan) -> str:
        """No CALL_ID yet: wait for the register, or die with it if it was dead-lettered."""
        dead = [e for e in self.store.entries(entry.linkedid, DEAD) if e.kind == "register"]
        if dead:
            plan.settled.append(Mark(entry, DEAD, f"waits for the dead-lettered register #{dead[0].id}"))
            return "dead"
        plan.settled.append(Mark(entry, PENDING, "waits for its call's register", next_try=self.now + WAIT_AGAIN,
                                 attempted=False))
        return "wait"

    def _plan_register(self, entry: Entry, state: CallState, plan: Plan) -> str:
        params = dict(entry.payload)
        pbx = getattr(self.store, "pbx", "")
        if pbx and params.get("EXTERNAL_CALL_ID"):
            # Several PBXs on one portal: linkedids repeat across them, the portal's dedup key must not.
            params["EXTERNAL_CALL_ID"] = f"{pbx}:{params['EXTERNAL_CALL_ID']}"
        parent_key = params.pop("_bind_from", None)
        maybe_shown = params.pop("_maybe_shown", None)
        if parent_key:
            # A transfer part is bound to the client the first part was bound to (the first part
            # gone from the database: no binding to copy).
            if parent_key in plan.registering:
                return "later"  # the first part's register is in this request: the next round
            parent = self.store.call(parent_key)
            if parent is not None and not parent.call_id:
                plan.settled.append(Mark(entry, PENDING, "waits for the register of the call's first part",
                                         next_try=self.now + WAIT_AGAIN, attempted=False))
                return "wait"
            if parent is not None and parent.crm_type and parent.crm_id:
                params.update(CRM_ENTITY_TYPE=parent.crm_type, CRM_ENTITY_ID=parent.crm_id)
        if state.call is not None and state.call.finish_claimed is not None and params.get("SHOW"):
            # Replayed after the call ended: log it without popping a card for a call long gone
            # (SHOW is not part of the portal's dedup key, so a repeat still finds the same call).
            params["SHOW"] = 0
            if not maybe_shown:
                # Nobody can have its card. One that may have been shown (an earlier attempt
                # reached the portal, its answer lost) stays live: the card moves still hide it.
                plan.not_live.append(entry.linkedid)
                state.card_live = False
        key = f"r{entry.id}"
        went = self._add(plan, Planned(entry, [key], params=params), [(key, payloads.REGISTER, params)], [])
        if went == "send":
            state.call_id, state.register_key = f"$result[{key}][CALL_ID]", key
            plan.registering.add(entry.linkedid)
        return went

    def _plan_card(self, entry: Entry, state: CallState, plan: Plan) -> str:
        show, hide = list(entry.payload.get("show", [])), list(entry.payload.get("hide", []))
        call = state.call
        if not state.card_live:
            show = hide = []  # registered after the call ended: nobody has a card
        elif state.finished or (call is not None and call.finish_claimed is not None
                                and entry.id < self._finish_id(entry)):
            show = []  # replayed after the call ended: a card would only flash
        if not show and not hide:
            if state.sending:
                # Nothing to send, but it is settled only with the entries before it in this request.
                plan.planned.append(Planned(entry, [], ref=state.register_key))
                return "send"
            plan.settled.append(Mark(entry, DONE))
            return "done"
        lookups, ids = [], {}
        for inner in show + hide:
            cached = self.store.user_id(inner)
            if cached is None:
                lookups.append(inner)
                ids[inner] = f"$result[u{inner}][0][ID]"
            else:
                ids[inner] = cached
        commands = []
        if show:
            commands.append((f"s{entry.id}", payloads.SHOW,
                             {"CALL_ID": state.call_id, "USER_ID": [ids[i] for i in show]}))
        if hide:
            commands.append((f"h{entry.id}", payloads.HIDE,
                             {"CALL_ID": state.call_id, "USER_ID": [ids[i] for i in hide]}))
        return self._add(plan, Planned(entry, [c[0] for c in commands], ref=state.register_key), commands,
                         list(dict.fromkeys(lookups)))

    def _finish_id(self, entry: Entry) -> int:
        ids = [e.id for e in self.store.entries(entry.linkedid) if e.kind == "finish"]
        return min(ids) if ids else 0

    def _plan_finish(self, entry: Entry, state: CallState, plan: Plan) -> str:
        key = f"f{entry.id}"
        went = self._add(plan, Planned(entry, [key], ref=state.register_key),
                         [(key, payloads.FINISH, dict(entry.payload, CALL_ID=state.call_id))], [])
        if went == "send":
            state.finish_key = key
        return went

    def _plan_record(self, entry: Entry, state: CallState, plan: Plan) -> str:
        if not state.finished and state.finish_key is None:
            # attachRecord works only after finish; the finish waits elsewhere (a lease, a backoff).
            plan.settled.append(Mark(entry, PENDING, "waits for its call's finish", next_try=self.now + WAIT_AGAIN,
                                     attempted=False))
            return "wait"
        path, name = entry.payload["path"], entry.payload["name"]
        try:
            st = os.stat(path)
        except OSError as exc:
            if time.time() - entry.created_at < MISSING_GRACE:  # the file system's clock from here on
                plan.settled.append(Mark(entry, PENDING, f"recording {name} not there yet",
                                         next_try=self.now + 15, attempted=False))
                return "wait"
            plan.settled.append(Mark(entry, DEAD, f"recording {name} cannot be read: {exc.strerror}"))
            return "dead"
        if time.time() - st.st_mtime < SETTLE_SECONDS:
            # MixMonitor may still be writing it after the hangup handler ran.
            plan.settled.append(Mark(entry, PENDING, f"recording {name} is still being written",
                                     next_try=st.st_mtime + SETTLE_SECONDS + 0.1, attempted=False))
            return "wait"
        if st.st_size == 0:
            plan.settled.append(Mark(entry, DEAD, f"recording {name} is empty"))
            return "dead"
        if not self.recording_url:
            plan.inline.append((entry, state))  # not through batch: on its own, after it
            return "inline"
        key = f"a{entry.id}"
        params = {"CALL_ID": state.call_id, "FILENAME": name, "RECORD_URL": self.recording_url.replace("{name}", name)}
        return self._add(plan, Planned(entry, [key], ref=state.register_key),
                         [(key, payloads.ATTACH_RECORD, params)], [])

    def _plan_rest(self, entry: Entry, state: CallState, plan: Plan) -> str:
        key = f"x{entry.id}"
        command = (key, entry.payload["method"], entry.payload.get("params") or {})
        return self._add(plan, Planned(entry, [key]), [command], [])

    # -- reading the answers ------------------------------------------------------------------------
    def settle(self, plan: Plan, answers: Answers) -> List[Mark]:
        """The mark of every entry that went in the request."""
        for inner, key in plan.lookups.items():
            outcome, rows = answers.of(key)
            if outcome == "ok" and isinstance(rows, list) and rows and isinstance(rows[0], dict) and rows[0].get("ID"):
                self.store.remember_user(inner, int(rows[0]["ID"]))
        marks: List[Mark] = []
        broken: Dict[str, str] = {}  # call -> why its chain broke in this request
        failed_refs: Dict[str, str] = {}  # register command -> why it failed
        for item in plan.planned:
            entry = item.entry
            if answers.failed is not None:
                # Whatever the reason, it is the request's, not this entry's: never a dead letter.
                marks.append(self.on_error(item, answers.failed, may_have_reached(answers.failed), own=False))
                continue
            if not item.keys and entry.linkedid in broken:
                marks.append(Mark(entry, PENDING, f"behind an entry of its call that failed ({broken[entry.linkedid]})",
                                  next_try=self.now + WAIT_AGAIN, attempted=False))
                continue
            if item.ref and item.ref in failed_refs:
                # Its CALL_ID came from a register that failed: the command found no call and did nothing.
                marks.append(Mark(entry, PENDING, f"waits for its register ({failed_refs[item.ref]})",
                                  next_try=self.now + backoff(entry.attempts + 1)))
                continue
            mark = self._read(item, answers)
            if entry.linkedid in broken and mark.state == DEAD:
                # An earlier entry of the call failed in this request: this failure may be its
                # consequence (attachRecord before the finish went through), not its own.
                mark = Mark(entry, PENDING, mark.note, next_try=self.now + backoff(entry.attempts + 1))
            if mark.state != DONE:
                broken.setdefault(entry.linkedid, mark.note)
                if entry.kind == "register" and not mark.sent:  # surely not done: no call to refer to
                    failed_refs[item.keys[0]] = mark.note
            marks.append(mark)
        return marks

    def _read(self, item: Planned, answers: Answers) -> Mark:
        entry = item.entry
        for key in item.users + item.keys:
            outcome, value = answers.of(key)
            if outcome == "unknown":
                # Odd or cut answer: the command may have run.
                return Mark(entry, PENDING, f"no answer for {key} in the batch answer", sent=True,
                            next_try=self.now + backoff(entry.attempts + 1))
            if outcome == "error":
                if entry.kind == "finish" and isinstance(value, NotFoundError) and entry.sending_at is not None:
                    # An earlier attempt reached the portal but its answer was lost: finished already.
                    self.log["note"] = f"finish repeated after an unanswered attempt: {value.description or value.code}"
                    return Mark(entry, DONE)
                return self.on_error(item, value, sent=key in answers.maybe_ran)
            if key in item.users and not (isinstance(value, list) and value and isinstance(value[0], dict)
                                          and value[0].get("ID")):
                inner = key[1:]
                return self.on_error(item, NotFoundError("USER_NOT_FOUND", f"no active employee has inner number "
                                                          f"{inner}", None, "user.get"), sent=False)
        if entry.kind == "register":
            result = answers.results[item.keys[0]]
            try:
                call_id = payloads.call_id_of(result)
            except ValueError as exc:
                return Mark(entry, DEAD, str(exc))
            crm = None
            if isinstance(result, dict) and result.get("CRM_ENTITY_TYPE") and \
                    str(result.get("CRM_ENTITY_ID") or "").isdigit():
                crm = (str(result["CRM_ENTITY_TYPE"]), int(result["CRM_ENTITY_ID"]))
            if isinstance(result, dict) and result.get("CRM_CREATED_LEAD"):
                self.log["lead_created"] = result["CRM_CREATED_LEAD"]
            return Mark(entry, DONE, call_id=call_id, crm=crm)
        if entry.kind == "record":
            self.log["recording"] = entry.payload.get("name")
        return Mark(entry, DONE)

    def on_error(self, item: Planned, exc: BitrixError, sent: bool, own: bool = True) -> Mark:
        """Retry what may heal, dead-letter the rest (only for the entry's own failure)."""
        entry = item.entry
        if own and not retryable(exc):
            return Mark(entry, DEAD, exc.summary())
        next_try = self.now + backoff(entry.attempts + 1)
        if isinstance(exc, LimitError) and exc.reset_at:
            next_try = max(next_try, float(exc.reset_at))
        if sent and entry.kind == "register" and item.params.get("SHOW"):
            self.store.note_maybe_shown(entry.id)  # sticky: later attempts cannot undo it
        return Mark(entry, PENDING, exc.summary(), next_try=next_try, sent=sent)

    def cascade(self, marks: List[Mark]) -> List[Mark]:
        """A dead-lettered register takes with it what needs its CALL_ID (other writes still go)."""
        out = []
        for mark in marks:
            if mark.state == DEAD and mark.entry.kind == "register":
                reason = f"waits for the dead-lettered register #{mark.entry.id}"
                for later in self.store.entries(mark.entry.linkedid, PENDING):
                    if later.kind in ("card", "finish", "record") and later.id > mark.entry.id:
                        out.append(Mark(later, DEAD, reason))
        return out
