"""The service's deliverer: one thread sends what the call steps journal, at the portal's pace.

- A call step hands its calls over (a ticket) and waits for the answer within its budget. A
  register or card move of a live call waits at most `[service] batch_window` to share one
  request with the calls arriving at the same time, and not at all once as many wait as such a
  request carries; everything waiting for them rides along (a few commands, so the step's answer
  stays quick).
- Anything else (a finish, a recording, task writes) goes at once while the portal's budget is
  far from used up; when it is not, it rides along with the next request that goes out, or goes
  when its step's budget is about to end.
- Every `[service] flush_interval` a pass drains what waits in full batches of 50, one request at
  a time, leaving LIVE_RESERVE slots of the portal's burst to live calls and stepping aside for
  any ticket that is due: a backlog never holds up a card.

The decisions are in `step()`, driven by the thread with the monotonic clock and by tests with a
clock they move.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set

from agi_bitrix.bitrix.client import BATCH_MAX
from agi_bitrix.deadline import Deadline
from agi_bitrix.outbox import LIVE_RESERVE, ROUND_BUDGET, FlushStats, Outbox, Round, new_owner

LIVE_COMMANDS = 10        # commands in a request that carries a live call's register or card move
LAZY_MARGIN = 1.0         # a ticket without urgency goes this long before its step's budget ends
SETTLE_GRACE = 0.5        # a step waits this long past its budget for the answer to be written down


@dataclass
class Ticket:
    keys: List[str]
    urgent: bool
    send_by: float        # clock time by which a request must carry it
    until: float          # clock time after which its step no longer waits
    done: threading.Event = field(default_factory=threading.Event)
    requests: int = 0     # the requests that carried its calls, for the step's log line
    portal: float = 0.0   # and the seconds they waited for the portal


class Courier:
    def __init__(self, window: Callable[[], float], clock: Callable[[], float] = time.monotonic,
                 owner: Optional[str] = None) -> None:
        self.window = window
        self.clock = clock
        self.owner = owner or new_owner()  # the service's steps lease what they journal in its name
        # The passes lease under a name of their own: what a step journaled is its ticket's to
        # carry while the step waits (its lease), and a pass's only once the step left it.
        self.pass_owner = new_owner()
        self._cond = threading.Condition()
        self._tickets: List[Ticket] = []
        self._pass: Optional[FlushStats] = None
        self._pass_upto = 0
        self.next_pass = float("-inf")
        self.batch, self.live_batch = BATCH_MAX, LIVE_COMMANDS  # commands per request (a benchmark's baseline: 1)
        self.finished: Optional[FlushStats] = None  # the pass that ended in the last step()

    # -- the call steps' side --------------------------------------------------------------------------
    def submit(self, keys: List[str], urgent: bool, budget: float, roomy: bool = False) -> Ticket:
        """A step's calls to deliver. `urgent`: a card is to pop up or move; `roomy`: the portal's
        budget is far from used up (no need to save requests)."""
        now = self.clock()
        if urgent:
            send_by = now + self.window()
        else:
            send_by = now if roomy else now + max(0.0, budget - min(LAZY_MARGIN, budget / 2))
        ticket = Ticket(list(keys), urgent, send_by, now + budget)
        with self._cond:
            self._tickets.append(ticket)
            self._cond.notify_all()
        return ticket

    def sleep(self, seconds: float) -> None:
        """The thread's pause, cut short by a new ticket (or wake()).

        A ticket handed over after step() worked out `seconds` (its notify came before this wait)
        is waited for too: the pause ends by its send_by, not at the next pass.
        """
        with self._cond:
            now = self.clock()
            due = min((t.send_by for t in self._tickets), default=now + seconds)
            if due > now:
                self._cond.wait(max(0.0, min(seconds, due - now)))

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def waiting(self) -> int:
        """Tickets not answered yet."""
        with self._cond:
            return sum(not t.done.is_set() for t in self._tickets)

    def pass_due(self) -> bool:
        return self._pass is None and self.clock() >= self.next_pass

    # -- the deliverer's side --------------------------------------------------------------------------
    def step(self, outbox: Outbox, interval: float) -> float:
        """Do what is due now (at most one request); seconds until something may be due next."""
        now = self.clock()
        self.finished = None
        with self._cond:
            self._tickets = [t for t in self._tickets if not t.done.is_set() and t.until > now]
            tickets = list(self._tickets)
        urgent = [t for t in tickets if t.urgent]
        # As many live calls waiting as a request carries fill it: no use waiting for more.
        if any(t.send_by <= now for t in tickets) or len(urgent) >= self.live_batch:
            keys = list(dict.fromkeys(k for t in sorted(tickets, key=lambda t: not t.urgent) for k in t.keys))
            # The request ends with the budget of the first step to give up, as its own would: a
            # stuck portal leaves the entries QUEUED with the reason, not the steps without one.
            budget = min(t.until for t in tickets) - now
            size = self.live_batch if urgent else self.batch
            done = outbox.round(Deadline(max(0.0, budget)), keys=keys, fill=True, max_commands=size)
            # A due call the request had room for but did not carry is another deliverer's now.
            self._answer(tickets, done, outbox, due=now if len(done.keys) < size else None)
            return 0.0  # the steps' log lines tell of this round, the pass's of its own
        wake = min([t.send_by for t in tickets] + [self.next_pass]) - now
        passing = Outbox(outbox.store, outbox.client, outbox.recording_url, self.pass_owner, outbox.log, outbox.clock)
        if self._pass is None and now >= self.next_pass:
            passing.free_stale_leases()
            self._pass, self._pass_upto = FlushStats(), outbox.store.last_entry_id()
        if self._pass is None:
            return max(0.0, wake)
        limiter = outbox.client.limiter
        delay = limiter.delay(LIVE_RESERVE) if limiter is not None else 0.0
        if delay > 0:
            return min(delay, max(0.0, min([t.send_by for t in tickets], default=now + delay) - now))
        done = passing.round(Deadline(ROUND_BUDGET), upto_id=self._pass_upto, max_commands=self.batch)
        self._pass.add(done)
        self._answer(tickets, done, outbox)
        if done.spent() or (done.failed is not None and not done.progress):
            if done.failed is not None:
                self._pass.stopped = done.failed.summary()
            self.finished, self._pass = self._pass, None
            self.next_pass = now + interval
            return max(0.0, min([t.send_by for t in tickets] + [self.next_pass]) - now)
        return 0.0

    def _answer(self, tickets: List[Ticket], done: Round, outbox: Outbox, due: Optional[float] = None) -> None:
        """Tickets whose calls this round carried, or that have nothing left to send (or, `due`:
        that were due by then), are answered."""
        carried = set(done.keys)
        # What still waits of the calls the round did not carry, in one query for all tickets.
        waiting = outbox.store.pending_kinds(list({k for t in tickets for k in t.keys if k not in carried}))
        for ticket in tickets:
            if carried & set(ticket.keys):
                ticket.requests += done.requests
                ticket.portal += done.portal
            if (due is not None and ticket.send_by <= due) or \
                    all(k in carried or k not in waiting for k in ticket.keys):
                ticket.done.set()


def roomy(limiter: Any, urgent: bool) -> bool:
    """Whether a ticket without urgency may go at once: the portal's budget is far from used up.
    Only such a ticket asks the shared bucket (a file under flock) for its room."""
    return not urgent and (limiter is None or limiter.room() > limiter.burst // 2)


def is_urgent(store: Any, keys: List[str], waiting: Optional[Dict[str, Set[str]]] = None) -> bool:
    """A register, or a card move of a call still going on, waits: a card is to pop up or move.
    `waiting`: the calls' pending kinds, when the caller has read them already."""
    waiting = store.pending_kinds(keys) if waiting is None else waiting
    for key in keys:
        kinds = waiting.get(key, set())
        if "register" in kinds:
            return True
        if "card" in kinds:
            call = store.call(key)
            if call is not None and call.finish_claimed is None:
                return True
    return False
