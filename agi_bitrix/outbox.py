"""Delivering the outbox: what the call steps journaled reaches Bitrix24 exactly once, in order,
in as few requests as the portal's budget (a burst of 50, then 2 per second) asks for.

A delivery round leases the waiting entries of a set of calls, plans them into one request
(outbox_batch.py: up to 50 commands of several calls, each call's in its order), marks them as
being sent, sends, and settles every entry by its own command's answer. The same rounds serve a
call step delivering its own call (process mode, within its budget), `agi-bitrix outbox flush`,
the worker, and the service's deliverer, which also shares one request among the calls arriving
together (service/courier.py).

Exactly once, even when a process dies mid-request:
- every entry of a call is leased by one deliverer at a time; a deliverer killed mid-batch leaves
  leases that another process on the same PBX frees at once (its process is gone), or that run out;
- register carries EXTERNAL_CALL_ID = linkedid, so the portal answers a repeat with the same CALL_ID;
- a finish whose previous attempt may have reached the portal (`sending_at` left set: the process
  died mid-request, or the answer was a timeout or a 5xx) takes "Call is not found" as proof it
  was finished already;
- card moves and attachRecord replace what they set, so a repeat changes nothing.
"""
from __future__ import annotations

import base64
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from agi_bitrix.bitrix import payloads
from agi_bitrix.bitrix.client import BATCH_MAX, Bitrix24
from agi_bitrix.bitrix.errors import BitrixError, LimitError
from agi_bitrix.deadline import Deadline
from agi_bitrix.outbox_batch import Answers, Plan, Planned, Planner, may_have_reached
from agi_bitrix.store import DEAD, DONE, PENDING, Entry, Mark, Store

INLINE_MAX = 5 * 1024 * 1024  # larger recordings go through the two-step uploadUrl
ROUND_BUDGET = 60.0           # off the call path: one round's requests, waits for the budget included
LEASE_MARGIN = 30.0           # a lease outlives the round's budget by this much
LIVE_RESERVE = 10             # slots of the burst a draining backlog leaves to the cards of live calls
MAX_NOTES = 20                # errors and dead letters kept for one log line


def new_owner() -> str:
    """Who holds a lease: this host and process (so a process killed mid-batch can be told gone)."""
    return f"{socket.gethostname()}:{os.getpid()}-{os.urandom(4).hex()}"  # not uuid: it imports `platform`


def owner_gone(owner: str) -> bool:
    """True when `owner` was a process of this host that no longer runs."""
    host, _, rest = owner.rpartition(":")
    pid = rest.split("-", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def describe_owner(owner: str) -> str:
    """A lease holder as an administrator reads it: `process 1234 on pbx1`."""
    host, _, rest = owner.rpartition(":")
    pid = rest.split("-", 1)[0]
    return f"process {pid} on {host}" if host and pid.isdigit() else owner


@dataclass
class FlushStats:
    delivered: int = 0
    waiting: int = 0
    dead: int = 0
    calls: int = 0
    requests: int = 0
    stopped: str = ""     # why a flush stopped early: the portal failed the whole request
    groups: List[Dict[str, Any]] = field(default_factory=list)  # what still waits, by reason
    errors: List[str] = field(default_factory=list)
    keys: List[str] = field(default_factory=list)   # the calls it leased

    def add(self, other: "FlushStats") -> None:
        for name in ("delivered", "waiting", "dead", "calls", "requests"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.stopped = other.stopped or self.stopped


@dataclass
class Round(FlushStats):
    progress: bool = False                          # something was delivered
    failed: Optional[BitrixError] = None            # the whole request failed
    portal: float = 0.0                             # seconds spent waiting for the portal's answers

    def spent(self) -> bool:
        """Nothing was left to carry, or nothing of what is left can go now."""
        return not self.keys or not (self.requests or self.delivered or self.dead or self.waiting)


class Outbox:
    def __init__(self, store: Store, client: Bitrix24, recording_url: str = "", owner: Optional[str] = None,
                 log: Optional[Dict[str, Any]] = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.client = client
        self.recording_url = recording_url
        self.owner = owner or new_owner()
        self.log = log if log is not None else {}
        self.clock = clock  # when entries are due and retried (a test moves it)

    # -- driving -------------------------------------------------------------------------------
    def deliver_keys(self, keys: List[str], deadline: Deadline, lease: Optional[float] = None) -> FlushStats:
        """Deliver these calls' entries, in order, until nothing more of them can go now or the
        budget ends (a call step, backoff ignored: it tries now)."""
        total = FlushStats()
        while deadline.remaining() >= 0.05:
            done = self.round(deadline, keys=keys, lease=lease)
            total.add(done)
            if not done.progress:
                break
        return total

    def deliver_call(self, linkedid: str, deadline: Deadline, lease: Optional[float] = None) -> FlushStats:
        return self.deliver_keys([linkedid], deadline, lease)

    def flush(self, force: bool = True, progress: Optional[Callable[[FlushStats], None]] = None) -> FlushStats:
        """Deliver what waits now, in full batches, until nothing more can go.

        `force` (an administrator's flush): everything waiting is tried now, whatever its backoff;
        without it (the worker) only what is due. Entries journaled after the start wait for the
        next pass. Stops early when the portal fails a whole request (it would fail the next
        one too). What still waits is in `groups`, by reason.
        """
        total = FlushStats()
        self.free_stale_leases()
        upto = self.store.last_entry_id()
        if force:
            self.store.make_due(upto)
        touched: set = set()
        while True:
            done = self.round(Deadline(ROUND_BUDGET), upto_id=upto)
            total.add(done)
            touched.update(done.keys)
            total.calls = len(touched)  # a call whose entries took two rounds is one call
            if progress is not None and done.requests:
                progress(total)
            if done.failed is not None and not done.progress:
                total.stopped = done.failed.summary()
                break
            if done.spent():
                break
        total.keys = sorted(touched)
        total.groups = self.store.waiting(upto)
        total.waiting = sum(g["count"] for g in total.groups)
        return total

    def free_stale_leases(self) -> int:
        """Leases of deliverers of this PBX that were killed (kill -9 mid-batch): free them now."""
        gone = [owner for owner in self.store.lease_owners() if owner != self.owner and owner_gone(owner)]
        return self.store.free_leases(gone)

    # -- one round -------------------------------------------------------------------------------
    def round(self, deadline: Deadline, keys: Optional[List[str]] = None, upto_id: Optional[int] = None,
              lease: Optional[float] = None, fill: bool = False, max_commands: int = BATCH_MAX) -> Round:
        """Lease, plan, send one request (plus inline recordings), settle. See the module doc.

        `keys`: these calls (backoff ignored); with `fill`, calls that are due fill the request up
        to `max_commands`. Without `keys`: the calls that are due, live ones first.
        """
        stats = Round()
        waited = self.client.portal_seconds
        if lease is None:
            lease = min(deadline.remaining(), ROUND_BUDGET) + LEASE_MARGIN
        entries = self.store.lease_calls(self.owner, lease, keys=keys, fill=fill or keys is None,
                                         due_by=self.clock(), upto_id=upto_id, limit=max_commands)
        if not entries:
            return stats
        stats.keys = list(dict.fromkeys(e.linkedid for e in entries))
        stats.calls = len(stats.keys)
        limiter = self.client.limiter
        planner = Planner(self.store, self.recording_url, self.log,
                          limiter.blocked_methods() if limiter is not None else None, self.clock())
        settled: set = set()
        try:
            plan = planner.plan(entries, max_commands)
            marks = list(plan.settled)
            if plan.commands and deadline.remaining() >= 0.05:
                answers = self._send(plan, deadline, stats)
                marks += planner.settle(plan, answers)
                stats.failed = answers.failed
            settled |= self._settle(planner, marks, stats)
            if plan.inline and stats.failed is None:
                settled |= self._send_inline(planner, plan, deadline, stats)
        finally:
            if any(e.id not in settled for e in entries):  # a mark gives up its entry's lease already
                self.store.release(stats.keys, self.owner)
            stats.portal = self.client.portal_seconds - waited
        return stats

    def _send(self, plan: Plan, deadline: Deadline, stats: Round) -> Answers:
        """The one request: a plain call for a single command, else a batch."""
        self.store.mark_sending([p.entry for p in plan.planned if p.keys], plan.not_live)
        stats.requests += 1
        if len(plan.commands) == 1:
            ((key, (method, params)),) = plan.commands.items()
            try:
                return Answers({key: self.client.call(method, params, deadline)}, {})
            except BitrixError as exc:
                return Answers({}, {key: exc})
        try:
            result = self.client.batch(plan.commands, deadline=deadline)
        except BitrixError as exc:
            return Answers({}, {}, failed=exc)
        errors = {}
        for key, (method, _) in plan.commands.items():
            err = result.error(key, method)
            if err is not None:
                if isinstance(err, LimitError) and err.code.lower() == "operation_time_limit" and \
                        self.client.limiter is not None:
                    # The portal blocks this one method for a while: every deliverer holds it back.
                    err.reset_at = self.client.limiter.block(method)
                errors[key] = err
        return Answers(result.results, errors)

    def _settle(self, planner: Planner, marks: List[Mark], stats: Round) -> set:
        """Write the marks down (and the dead letters they take along); the ids marked."""
        self.store.settle(marks)
        extra = planner.cascade(marks)
        self.store.settle(extra)
        for mark in marks + extra:
            entry = mark.entry
            if mark.state == DONE:
                stats.delivered += 1
                stats.progress = True
            elif mark.state == DEAD:
                stats.dead += 1
                self._note("dead_letters", f"{entry.kind} #{entry.id}: {mark.note}")
            else:
                stats.waiting += 1
                if mark.attempted:
                    self._note("delivery_errors", f"{entry.kind}: {mark.note}")
        return {m.entry.id for m in marks + extra}

    def _note(self, field_name: str, text: str) -> None:
        """For the log line of the step or pass (the first few: a backlog may fail by thousands)."""
        notes = self.log.setdefault(field_name, [])
        if len(notes) < MAX_NOTES:
            notes.append(text)

    def _send_inline(self, planner: Planner, plan: Plan, deadline: Deadline, stats: Round) -> set:
        """Recordings sent inline or uploaded, each on its own, once their call is finished; the
        ids marked."""
        settled: set = set()
        for entry, state in plan.inline:
            call = self.store.call(entry.linkedid)
            if call is None or not call.call_id or call.finished_at is None or deadline.remaining() < 0.05:
                continue  # its finish did not go through: the next round tries both again
            self.store.mark_sending([entry])
            stats.requests += 1
            try:
                mark = self._attach_inline(entry, call.call_id, deadline)
            except BitrixError as exc:
                mark = planner.on_error(Planned(entry, []), exc, may_have_reached(exc))
            except OSError as exc:  # gone since it was looked at: the next round looks again
                mark = Mark(entry, PENDING, f"recording {entry.payload['name']} cannot be read: {exc.strerror}",
                            next_try=self.clock() + 15)
            settled |= self._settle(planner, [mark], stats)
        return settled

    def _attach_inline(self, entry: Entry, call_id: str, deadline: Deadline) -> Mark:
        path, name = entry.payload["path"], entry.payload["name"]
        size = os.stat(path).st_size
        if size <= INLINE_MAX:
            with open(path, "rb") as fh:
                content = base64.b64encode(fh.read()).decode("ascii")
            self.client.call(payloads.ATTACH_RECORD, {"CALL_ID": call_id, "FILENAME": name,
                                                      "FILE_CONTENT": content}, deadline)
        else:
            answer = self.client.call(payloads.ATTACH_RECORD, {"CALL_ID": call_id, "FILENAME": name}, deadline)
            if not isinstance(answer, dict) or "uploadUrl" not in answer:
                return Mark(entry, DEAD, "attachRecord gave no uploadUrl")
            with open(path, "rb") as fh:
                self.client.upload(answer["uploadUrl"], answer.get("fieldName") or "file", name, fh, deadline)
        self.log["recording"] = name
        return Mark(entry, DONE)

    # -- what waits ------------------------------------------------------------------------------
    def estimate(self, kinds: Dict[str, int], rate: float, burst: int) -> Tuple[int, float]:
        """(requests, seconds) to deliver what waits at the portal's pace: the batchable entries
        in batches of 50 commands, an inline recording a request of its own, the burst at once."""
        inline = 0 if self.recording_url else kinds.get("record", 0)
        commands = sum(kinds.values()) - inline + kinds.get("card", 0)  # a card move: show and hide
        requests = -(-commands // BATCH_MAX) + inline
        limiter = self.client.limiter
        free = limiter.room() if limiter is not None else burst  # what the bucket lets through at once
        return requests, max(0, requests - free) / rate

