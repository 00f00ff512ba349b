"""One pass of the auto-dialer: read the due tasks, pick operators, dial, record what happened.

The order of checks follows what the README promises and what a call center expects
beyond it: nobody is dialed unless an operator is online and free; the responsible operator
takes his own tasks, and a task whose responsible stays away too long goes to another one;
calling hours and the do-not-call list are checked right before each dial; a number from the
CRM reaches a dial string only through the validator in phones.py.
"""
from __future__ import annotations

import fcntl
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from agi_bitrix import phones
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.deadline import Deadline
from agi_bitrix.dialer import outcomes, policy
from agi_bitrix.dialer.portal import Client, DueTask, Operator, Portal
from agi_bitrix.dialer.state import Attempt, TaskState, dialer_state
from agi_bitrix.dialer.texts import text
from agi_bitrix.outbox import Outbox
from agi_bitrix.store import Store

if TYPE_CHECKING:
    from agi_bitrix.settings import Settings

LOCK_FILE = "dialer.lock"
_NAME_SAFE = re.compile(r"[^\w .\-]", re.UNICODE)


class DialerBusy(Exception):
    """Another dialer process holds the lock."""


@dataclass
class PassReport:
    operators_free: int = 0
    due: int = 0
    dialed: List[str] = field(default_factory=list)
    outcomes: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[int, str] = field(default_factory=dict)
    note: str = ""


class DialerLock:
    """One dialer per PBX: a second `dialer run` (or a cron run overlapping a long one) waits its turn."""

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self.fd: Optional[int] = None

    def __enter__(self) -> "DialerLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise DialerBusy(f"another dialer is running (lock {self.path})") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def caller_name(client: str, prefix: str) -> str:
    """What the operator's phone shows: the dialer's mark and the client's name, made plain."""
    return (prefix + _NAME_SAFE.sub("", client)).strip()[:60]


class Dialer:
    def __init__(self, settings: Settings, store: Store, client: Bitrix24, ami: Any,
                 log: Optional[Dict[str, Any]] = None) -> None:
        self.settings = settings
        self.d = settings.dialer
        self.store = store
        self.state = dialer_state(store)
        self.client = client
        self.portal = Portal(client)
        self.ami = ami
        self.log: Dict[str, Any] = log if log is not None else {}
        self.outbox = Outbox(store, client, settings.calls.recording_url, log=self.log)
        self._line_ready = False
        self._touched: set = set()  # outbox keys of task writes queued in this pass

    # -- the pass -------------------------------------------------------------------------------
    def run_once(self, now: Optional[datetime] = None, log: Optional[Dict[str, Any]] = None) -> PassReport:
        """One pass; `log` collects this pass's fields for its log line."""
        if log is not None:
            self.log = self.outbox.log = log
        now = now or datetime.now().astimezone()
        report = PassReport()
        self._touched = set()
        self._ensure_line()
        group_id = self.portal.group_id(self.d.group)
        operators = self.portal.operators(group_id, self.d.use_timeman)
        live = self.state.live_attempts()
        free = self._free_operators(operators, {a.operator for a in live})
        report.operators_free = len(free)
        self.log["operators"] = {op.inner or f"#{uid}": ("free" if uid in free else "online" if op.online else
                                                        f"offline since {op.last_activity or '?'}")
                                 for uid, op in operators.items()}
        channels = self.d.max_channels - len(live)
        if not free or channels <= 0:
            report.note = "no operator online and free: nothing dialed" if not free else "all channels busy"
            return report
        tasks = self.portal.due_tasks(group_id, now)
        report.due = len(tasks)
        self.portal.fill_clients(tasks)
        dnc = policy.load_dnc(self.d.dnc_file, self.settings.calls.region)
        pending: List[Tuple[Any, Attempt]] = []
        for task in tasks:
            if channels <= 0 or not free:
                break
            reason = self._consider(task, operators, free, dnc, now, pending)
            if reason:
                report.skipped[task.id] = reason
            else:
                channels -= 1
        report.dialed = [a.attempt_id for _, a in pending]
        for originate, attempt in pending:
            report.outcomes[attempt.attempt_id] = self._await(originate, attempt)
        self._deliver({a.attempt_id for _, a in pending} | self._touched)
        return report

    def _ensure_line(self) -> None:
        """The dialer's own external line: its NAME tells the operator where the call comes from."""
        if self._line_ready:
            return
        try:
            self.client.call("telephony.externalLine.add", {"NUMBER": self.d.line_number, "NAME": self.d.line_name,
                                                            "CRM_AUTO_CREATE": "N"})
        except BitrixError as exc:
            if "already exists" not in (exc.description or "").lower():
                self.log["line_note"] = exc.summary()
        self._line_ready = True

    def _free_operators(self, operators: Dict[int, Operator], busy_inners: set) -> Dict[int, Operator]:
        free = {}
        for uid, op in operators.items():
            if not op.inner or not phones.inner_number(op.inner) or not op.online or op.inner in busy_inners:
                continue
            if self.d.use_timeman and op.workday != "OPENED":
                continue
            if not self._phone_idle(op.inner):
                continue
            free[uid] = op
        return free

    def _phone_idle(self, inner: str) -> bool:
        """The phone's state in Asterisk (ExtensionState on its hint); no hint = cannot tell = assume idle."""
        try:
            status, _ = self.ami.extension_state(inner, self.d.hint_context)
        except Exception as exc:  # AMI trouble must not stop the pass; dialing will fail visibly
            self.log["ami_note"] = f"extension state of {inner}: {exc}"
            return True
        return status in (0, -1, -2)

    def _consider(self, task: DueTask, operators: Dict[int, Operator], free: Dict[int, Operator],
                  dnc: set, now: datetime, pending: List[Tuple[Any, Attempt]]) -> str:
        """Dial this task now, or say why not (the reason goes to the log)."""
        st = self.state.task(task.id)
        known = st.last_attempt or 0.0  # the latest attempt this dialer knows of
        st.title = task.title
        if st.final and not self._reopened(task, st):
            return "done"
        if st.next_try > time.time():
            return "waiting for the next try"
        writes: List[Tuple[str, Any]] = []
        operator = self._operator_for(task, st, operators, free, writes)
        if operator is None:
            self._save(st, task, writes)
            return "responsible not available yet"
        numbers, bad = self._numbers(task)
        if not numbers:
            if outcomes.note_once(st, "no_phone"):
                extra = text(self.d.language, "bad_numbers", numbers=", ".join(bad[:5])) if bad else ""
                writes.append(outcomes.comment(task.id, text(self.d.language, "no_phone", bad=extra)))
            st.next_try = time.time() + self.d.retry_unreachable
            self._save(st, task, writes)
            return "no phone"
        client, number = numbers[st.attempts % len(numbers)]
        st.client = client.name
        # Checked right before the dial: the list and the hours may have changed since the last pass.
        if number in dnc or policy.flagged_dnc(client.fields, self.d.dnc_field):
            if outcomes.note_once(st, "dnc"):
                writes.append(outcomes.comment(task.id, text(self.d.language, "dnc", phone=number)))
            st.final = time.time()
            self._save(st, task, writes)
            return "do not call"
        if not policy.within_hours(number, self.d, now):
            self._save(st, task, writes)
            return "outside calling hours"
        attempt, originate = self._dial(task, client, number, operator, known)
        if originate is None and attempt is None:
            return "dialed by another dialer"  # its view of the task is newer: nothing to save
        if originate is None:
            self._save(st, task, writes)
            return "not dialed"
        st.operator = operator.inner or ""
        self._save(st, task, writes)
        free.pop(operator.user_id, None)
        pending.append((originate, attempt))
        return ""

    def _reopened(self, task: DueTask, st: TaskState) -> bool:
        """A finished task whose deadline a person moved past our last decision is dialed again."""
        try:
            deadline = datetime.fromisoformat(task.deadline).timestamp()
        except ValueError:
            return False
        if st.final and deadline > st.final:
            st.final, st.attempts, st.notes = None, 0, []
            return True
        return False

    def _operator_for(self, task: DueTask, st: TaskState, operators: Dict[int, Operator],
                      free: Dict[int, Operator], writes: List[Tuple[str, Any]]) -> Optional[Operator]:
        responsible = operators.get(task.responsible_id)
        if responsible is not None and task.responsible_id in free:
            st.away_since = None
            return responsible
        if responsible is None:  # not a member of the group: hand the task to one who is
            new = self._pick_free(free)
            writes += self._reassign(task, new, text(self.d.language, "outside_group", group=self.d.group,
                                                     new=new.name))
            return new
        if not responsible.inner and outcomes.note_once(st, "no_inner"):
            writes.append(outcomes.comment(task.id, text(self.d.language, "no_inner", operator=responsible.name)))
        st.away_since = st.away_since or time.time()
        if time.time() - st.away_since < self.d.reassign_after:
            return None
        new = self._pick_free(free)
        st.away_since = None
        writes += self._reassign(task, new, text(self.d.language, "reassigned", old=responsible.name,
                                                 minutes=int(self.d.reassign_after // 60), new=new.name))
        return new

    @staticmethod
    def _pick_free(free: Dict[int, Operator]) -> Operator:
        """A free operator (every free one is idle); the lowest user id keeps the choice predictable."""
        return free[min(free)]

    def _reassign(self, task: DueTask, new: Operator, message: str) -> List[Tuple[str, Any]]:
        self.log.setdefault("reassigned", []).append(f"task {task.id} -> {new.user_id}")
        task.responsible_id = new.user_id
        return [("tasks.task.update", {"taskId": task.id, "fields": {"RESPONSIBLE_ID": new.user_id}}),
                outcomes.comment(task.id, message)]

    def _numbers(self, task: DueTask) -> Tuple[List[Tuple[Client, str]], List[str]]:
        """Every dialable number of the task's clients, in turn; the refused ones for the comment."""
        good: List[Tuple[Client, str]] = []
        bad: List[str] = []
        for client in task.clients:
            for raw in client.phones:
                try:
                    number = phones.dialable(raw, self.settings.calls.region, "e164")
                except phones.InvalidNumber:
                    bad.append(repr(raw[:30]))
                    continue
                if number not in [n for _, n in good]:
                    good.append((client, number))
        return good, bad

    def _dial(self, task: DueTask, client: Client, number: str, operator: Operator,
              known: Optional[float] = None) -> Tuple[Optional[Attempt], Any]:
        """The attempt and its Originate; (None, None) when another dialer holds the task."""
        attempt_id = f"dialer-{task.id}-{int(time.time())}-{uuid.uuid4().hex[:6]}"
        attempt = Attempt(attempt_id, task.id, number, operator.inner or "", self.d.mode,
                          {"title": task.title, "client": client.name, "crm_type": client.entity_type,
                           "crm_id": client.entity_id, "operator_name": operator.name,
                           "operator_id": operator.user_id, "responsible_id": task.responsible_id,
                           "deadline": task.deadline},
                          time.time(), "dialing", None)
        if not self.state.start_attempt(attempt, known):
            return None, None
        variables = {"DIALER_ATTEMPT": attempt_id, "DIALER_TASK": str(task.id)}
        ring_ms = self.d.ring_timeout * 1000
        try:
            if self.d.mode == "client_first":
                trunk = phones.dialable(number, self.settings.calls.region, self.settings.asterisk.number_format)
                channel = phones.dial_string(self.settings.asterisk.dial_template, trunk)
                originate = self.ami.originate(channel, context="bitrix-dialer", exten="client", timeout_ms=ring_ms,
                                               variables=variables, channel_id=attempt_id)
            else:
                channel = self.d.operator_channel.replace("{inner}", operator.inner or "")
                name = caller_name(client.name, self.d.caller_prefix)
                originate = self.ami.originate(channel, context="bitrix-dialer", exten="operator", timeout_ms=ring_ms,
                                               caller_id=f'"{name}" <{number}>', variables=variables,
                                               channel_id=attempt_id)
        except Exception as exc:  # AMI down or refused: our failure, not the client's attempt
            self.log.setdefault("dial_errors", []).append(f"{attempt_id}: {exc}")
            outcomes.record_outcome(self.store, self.state, self.settings, attempt_id, "failed", self.outbox.owner)
            return attempt, None
        self.log.setdefault("dialed", []).append(attempt_id)
        return attempt, originate

    def _await(self, originate: Any, attempt: Attempt) -> str:
        try:
            result = originate.wait(self.d.ring_timeout + 15)
        except Exception as exc:
            self.log.setdefault("dial_errors", []).append(f"{attempt.attempt_id}: {exc}")
            outcomes.record_outcome(self.store, self.state, self.settings, attempt.attempt_id, "failed",
                                    self.outbox.owner)
            return "failed"
        outcome = policy.REASONS.get(result.reason, "failed")
        if outcome == "answered":
            return outcome  # the dialplan's steps take it from here
        outcomes.record_outcome(self.store, self.state, self.settings, attempt.attempt_id, outcome,
                                self.outbox.owner)
        return outcome

    def _save(self, st: TaskState, task: DueTask, writes: List[Tuple[str, Any]]) -> None:
        self.state.save_task(st)
        if writes:
            self.store.queue_rest(f"task-{task.id}", writes, self.outbox.owner, 30.0)
            self._touched.add(f"task-{task.id}")

    def _deliver(self, linkedids: set) -> None:
        for linkedid in sorted(linkedids):
            self.outbox.deliver_call(linkedid, Deadline(30.0))
