"""Delivering the outbox: what the call steps queued reaches Bitrix24 exactly once, in order.

Per call the order is register -> card moves -> finish -> recording (creation order of the
entries). A finish waits for its call's CALL_ID; an entry that fails for a reason that will not
heal goes to the dead letters with that reason and never blocks other calls. The same code
serves the live call step (within its time budget), `agi-bitrix outbox flush` and the worker.

Exactly once, even when a process dies mid-request:
- register carries EXTERNAL_CALL_ID = linkedid, so the portal answers a repeat with the same CALL_ID;
- a finish whose previous attempt may have reached the portal (`sending_at` left set: the process
  died mid-request, or the answer was a timeout or a 5xx) takes "Call is not found" as proof it
  was finished already;
- card moves and attachRecord replace what they set, so a repeat changes nothing.
"""
from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from agi_bitrix.bitrix import payloads
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.bitrix.errors import (AuthError, BitrixError, LimitError, NetworkError, NotFoundError,
                                      ScopeError)
from agi_bitrix.deadline import Deadline
from agi_bitrix.store import Entry, Store

INLINE_MAX = 5 * 1024 * 1024  # larger recordings go through the two-step uploadUrl
SETTLE_SECONDS = 2.0          # a recording is complete once it stopped changing this long
MISSING_GRACE = 600.0         # how long a recording may take to appear before it is given up
MAX_BACKOFF = 600.0


def _may_have_reached(exc: BitrixError) -> bool:
    """A timeout or a 5xx: the portal may have done the work and only its answer was lost (a
    gateway's 502/504, a 503 that is no rate limit). A refused connection never reached it."""
    return isinstance(exc, NetworkError) and (exc.code == "TIMEOUT" or (exc.status or 0) >= 500)


def new_owner() -> str:
    return f"{os.getpid()}-{os.urandom(4).hex()}"  # not uuid: it imports `platform`, a step's ms


def backoff(attempts: int) -> float:
    return min(MAX_BACKOFF, 5.0 * 2 ** max(0, attempts - 1))


@dataclass
class FlushStats:
    delivered: int = 0
    waiting: int = 0
    dead: int = 0
    calls: int = 0
    errors: List[str] = field(default_factory=list)


class Outbox:
    def __init__(self, store: Store, client: Bitrix24, recording_url: str = "", owner: Optional[str] = None,
                 log: Optional[Dict[str, Any]] = None) -> None:
        self.store = store
        self.client = client
        self.recording_url = recording_url
        self.owner = owner or new_owner()
        self.log = log if log is not None else {}

    # -- driving -------------------------------------------------------------------------------
    def deliver_call(self, linkedid: str, deadline: Deadline, lease: float = 30.0, force: bool = True) -> FlushStats:
        """Deliver the entries of one call, in order, until one cannot go now.

        `force` ignores the retry backoff: a live call step or an administrator's flush tries now;
        only the worker's passes wait for it.
        """
        stats = FlushStats(calls=1)
        entries = self.store.claim(linkedid, self.owner, lease)
        try:
            for entry in entries:
                if (not force and entry.next_try > time.time()) or deadline.remaining() < 0.05:
                    stats.waiting += 1
                    break
                outcome = self._deliver(entry, deadline)
                if outcome == "done":
                    stats.delivered += 1
                    continue
                if outcome == "dead":
                    stats.dead += 1
                else:
                    stats.waiting += 1
                break
        finally:
            if stats.delivered < len(entries):  # marking one done gave up its lease already
                self.store.release(linkedid, self.owner)
        return stats

    def flush(self, per_call: Optional[float] = None, force: bool = True) -> FlushStats:
        """One pass over every call with waiting entries (safe to run concurrently with itself)."""
        total = FlushStats()
        for linkedid in self.store.due_calls(force):
            stats = self.deliver_call(linkedid, Deadline(per_call), lease=max(60.0, (per_call or 0) + 30),
                                      force=force)
            total.calls += 1
            total.delivered += stats.delivered
            total.waiting += stats.waiting
            total.dead += stats.dead
        return total

    # -- one entry -----------------------------------------------------------------------------
    def _deliver(self, entry: Entry, deadline: Deadline) -> str:
        handler = getattr(self, f"_deliver_{entry.kind}", None)
        if handler is None:
            self.store.mark_dead(entry.id, f"unknown entry kind {entry.kind!r}", entry.sending_at)
            return "dead"
        try:
            return handler(entry, deadline)
        except BitrixError as exc:
            return self._failed(entry, exc)

    def _failed(self, entry: Entry, exc: BitrixError) -> str:
        """Retry what may heal (network, limits, auth and scopes an administrator fixes); dead-letter the rest."""
        if isinstance(exc, (NetworkError, LimitError, AuthError, ScopeError)) or exc.retryable:
            next_try = time.time() + backoff(entry.attempts + 1)
            if isinstance(exc, LimitError) and exc.reset_at:
                next_try = max(next_try, float(exc.reset_at))
            sent = _may_have_reached(exc)
            self.store.mark_retry(entry.id, exc.summary(), next_try, sent, entry.sending_at)
            if sent and entry.kind == "register" and entry.payload.get("SHOW"):
                self.store.note_maybe_shown(entry.id)  # sticky: later attempts cannot undo it
            self.log.setdefault("delivery_errors", []).append(f"{entry.kind}: {exc.summary()}")
            return "waiting"
        self._dead(entry, exc.summary())
        return "dead"

    def _dead(self, entry: Entry, reason: str) -> None:
        self.store.mark_dead(entry.id, reason, entry.sending_at)
        self.log.setdefault("dead_letters", []).append(f"{entry.kind} #{entry.id}: {reason}")
        if entry.kind == "register":
            # Nothing that needs this call's CALL_ID can be delivered now (other writes still can).
            for later in self.store.entries(entry.linkedid, "pending"):
                if later.kind in ("card", "finish", "record"):
                    self.store.mark_dead(later.id, f"waits for the dead-lettered register #{entry.id}",
                                           later.sending_at)

    def _waits_for_register(self, entry: Entry) -> str:
        """No CALL_ID yet: wait for the register, or die with it if it was dead-lettered."""
        dead = [e for e in self.store.entries(entry.linkedid, "dead") if e.kind == "register"]
        if dead:
            self._dead(entry, f"waits for the dead-lettered register #{dead[0].id}")
            return "dead"
        return "waiting"

    def _deliver_register(self, entry: Entry, deadline: Deadline) -> str:
        params = dict(entry.payload)
        pbx = getattr(self.store, "pbx", "")
        if pbx and params.get("EXTERNAL_CALL_ID"):
            # Several PBXs on one portal: linkedids repeat across them, the portal's dedup key must not.
            params["EXTERNAL_CALL_ID"] = f"{pbx}:{params['EXTERNAL_CALL_ID']}"
        parent_key = params.pop("_bind_from", None)
        maybe_shown = params.pop("_maybe_shown", None)
        if parent_key:
            # A transfer part is bound to the client the first part was bound to.
            parent = self.store.call(parent_key)
            if parent is None or not parent.call_id:
                return "waiting"
            if parent.crm_type and parent.crm_id:
                params.update(CRM_ENTITY_TYPE=parent.crm_type, CRM_ENTITY_ID=parent.crm_id)
        call = self.store.call(entry.linkedid)
        if call is not None and call.finish_claimed is not None and params.get("SHOW"):
            # Replayed after the call ended: log it without popping a card for a call long gone
            # (SHOW is not part of the portal's dedup key, so a repeat still finds the same call).
            params["SHOW"] = 0
            if not maybe_shown:
                # Nobody can have its card. One that may have been shown (an earlier attempt
                # reached the portal, its answer lost) stays live: the card moves still hide it.
                self.store.card_not_live(entry.linkedid)
        self.store.mark_sending(entry)
        result = self.client.call(payloads.REGISTER, params, deadline)
        try:
            call_id = payloads.call_id_of(result)
        except ValueError as exc:
            self._dead(entry, str(exc))
            return "dead"
        crm = None
        if isinstance(result, dict) and result.get("CRM_ENTITY_TYPE") and str(result.get("CRM_ENTITY_ID") or "").isdigit():
            crm = (str(result["CRM_ENTITY_TYPE"]), int(result["CRM_ENTITY_ID"]))
        self.store.mark_done(entry, call_id, crm)
        if isinstance(result, dict) and result.get("CRM_CREATED_LEAD"):
            self.log["lead_created"] = result["CRM_CREATED_LEAD"]
        return "done"

    def _deliver_card(self, entry: Entry, deadline: Deadline) -> str:
        call = self.store.call(entry.linkedid)
        if call is None or not call.call_id:
            return self._waits_for_register(entry)
        show, hide = list(entry.payload.get("show", [])), list(entry.payload.get("hide", []))
        if not call.card_live:
            show = hide = []  # registered after the call ended: nobody has a card
        elif call.finished_at is not None or (call.finish_claimed is not None and entry.id < self._finish_id(entry)):
            show = []  # replayed after the call ended: a card would only flash
        if not show and not hide:
            self.store.mark_done(entry)
            return "done"
        self.store.mark_sending(entry)
        self._change_card(call.call_id, show, hide, deadline)
        self.store.mark_done(entry)
        return "done"

    def _finish_id(self, entry: Entry) -> int:
        ids = [e.id for e in self.store.entries(entry.linkedid) if e.kind == "finish"]
        return min(ids) if ids else 0

    def _change_card(self, call_id: str, show: List[str], hide: List[str], deadline: Deadline) -> None:
        """Show the card to `show`, hide it from `hide`: one batch request.

        User ids come from the local cache; unknown ones are looked up inside the same batch and
        referenced as `$result[...]`.
        """
        commands: Dict[str, Any] = {}

        def user_ref(inner: str) -> Any:
            cached = self.store.user_id(inner)
            if cached is not None:
                return cached
            commands[f"u{inner}"] = ("user.get", {"FILTER": {"UF_PHONE_INNER": inner, "ACTIVE": "true"}})
            return f"$result[u{inner}][0][ID]"

        show_ids = [user_ref(inner) for inner in show]
        hide_ids = [user_ref(inner) for inner in hide]
        if show_ids:
            commands["show"] = (payloads.SHOW, {"CALL_ID": call_id, "USER_ID": show_ids})
        if hide_ids:
            commands["hide"] = (payloads.HIDE, {"CALL_ID": call_id, "USER_ID": hide_ids})
        result = self.client.batch(commands, deadline=deadline)
        for key in [k for k in commands if k.startswith("u")]:
            rows = result.results.get(key)
            if isinstance(rows, list) and rows and isinstance(rows[0], dict) and rows[0].get("ID"):
                self.store.remember_user(key[1:], int(rows[0]["ID"]))
            elif not result.error(key):
                raise NotFoundError("USER_NOT_FOUND", f"no active employee has inner number {key[1:]}",
                                    None, "user.get")
        for key in commands:
            err = result.error(key)
            if err:
                raise err

    def _deliver_finish(self, entry: Entry, deadline: Deadline) -> str:
        call = self.store.call(entry.linkedid)
        if call is None or not call.call_id:
            return self._waits_for_register(entry)
        maybe_sent = entry.sending_at is not None
        self.store.mark_sending(entry)
        params = dict(entry.payload, CALL_ID=call.call_id)
        try:
            self.client.call(payloads.FINISH, params, deadline)
        except NotFoundError as exc:
            if not maybe_sent:
                raise
            # An earlier attempt reached the portal but its answer was lost: finished already.
            self.log["note"] = f"finish repeated after an unanswered attempt: {exc.description or exc.code}"
        self.store.mark_done(entry)
        return "done"

    def _deliver_rest(self, entry: Entry, deadline: Deadline) -> str:
        self.store.mark_sending(entry)
        self.client.call(entry.payload["method"], entry.payload.get("params") or {}, deadline)
        self.store.mark_done(entry)
        return "done"

    def _deliver_record(self, entry: Entry, deadline: Deadline) -> str:
        call = self.store.call(entry.linkedid)
        if call is None or not call.call_id:
            return self._waits_for_register(entry)
        if call.finished_at is None:
            return "waiting"  # attachRecord works only after finish
        path, name = entry.payload["path"], entry.payload["name"]
        try:
            st = os.stat(path)
        except OSError as exc:
            if time.time() - entry.created_at < MISSING_GRACE:
                self.store.postpone(entry.id, f"recording {name} not there yet", time.time() + 15)
                return "waiting"
            self._dead(entry, f"recording {name} cannot be read: {exc.strerror}")
            return "dead"
        if time.time() - st.st_mtime < SETTLE_SECONDS:
            # MixMonitor may still be writing it after the hangup handler ran.
            self.store.postpone(entry.id, f"recording {name} is still being written", st.st_mtime + SETTLE_SECONDS + 0.1)
            return "waiting"
        if st.st_size == 0:
            self._dead(entry, f"recording {name} is empty")
            return "dead"
        self.store.mark_sending(entry)
        if self.recording_url:
            params = {"CALL_ID": call.call_id, "FILENAME": name,
                      "RECORD_URL": self.recording_url.replace("{name}", name)}
            self.client.call(payloads.ATTACH_RECORD, params, deadline)
        elif st.st_size <= INLINE_MAX:
            with open(path, "rb") as fh:
                content = base64.b64encode(fh.read()).decode("ascii")
            self.client.call(payloads.ATTACH_RECORD, {"CALL_ID": call.call_id, "FILENAME": name,
                                                      "FILE_CONTENT": content}, deadline)
        else:
            answer = self.client.call(payloads.ATTACH_RECORD, {"CALL_ID": call.call_id, "FILENAME": name}, deadline)
            if not isinstance(answer, dict) or "uploadUrl" not in answer:
                self._dead(entry, "attachRecord gave no uploadUrl")
                return "dead"
            with open(path, "rb") as fh:
                self.client.upload(answer["uploadUrl"], answer.get("fieldName") or "file", name, fh, deadline)
        self.store.mark_done(entry)
        self.log["recording"] = name
        return "done"
