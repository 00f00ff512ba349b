"""Bitrix24 events: click-to-call (ONEXTERNALCALLSTART) and the website callback form
(ONEXTERNALCALLBACKSTART), received by `agi-bitrix serve` or polled by the worker.

Click-to-call (Bitrix24 REST docs: ONEXTERNALCALLSTART): Bitrix24 has already registered the call and sends its CALL_ID.
agi-bitrix rings the employee's phone first (AMI Originate into [bitrix-click2call]); when he
answers, the `click-answered` step dials the client; the call's hangup step finishes that same
CALL_ID with the real outcome. Never a second register. Whatever stops it earlier (no inner
number, phone offline, employee not answering, a bad number, a repeated click) still finishes the
CALL_ID with a failure status and the reason, so no card hangs in Bitrix24.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from agi_bitrix import phones
from agi_bitrix.bitrix import payloads
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.deadline import Deadline
from agi_bitrix.outbox import Outbox
from agi_bitrix.settings import Settings
from agi_bitrix.store import DOUBLE_CLICK, TAKEN, Store
from agi_bitrix.stores import open_store

CLICK = "ONEXTERNALCALLSTART"
CALLBACK = "ONEXTERNALCALLBACKSTART"
BOUND_EVENTS = (CLICK, CALLBACK)
CONTEXT = "bitrix-click2call"
_CALL_ID = re.compile(r"[A-Za-z0-9._\-]{1,120}")
LEASE = 30.0
# OriginateResponse Reason when the employee's own phone did not take the call -> finish status
_EMPLOYEE_FAILED = {3: ("304", "the employee did not answer"), 5: ("486", "the employee's phone was busy"),
                    8: ("503", "congestion reaching the employee's phone"),
                    0: ("480", "the employee's phone could not be reached"),
                    1: ("480", "the employee's phone could not be reached")}


class EventRefused(Exception):
    """Forged, foreign or malformed: logged, nothing dialed."""


def verify(auth: Any, application_token: str, member_id: str, domain: str = "") -> None:
    """An online event must carry our application_token (stored from a proven installation callback)
    and our portal's member_id and domain (Bitrix24 REST docs: safe event handlers)."""
    if not application_token:
        raise EventRefused("no application_token is known yet: install the application with this handler as "
                           "its installation path, or use [events] delivery = offline")
    auth = auth if isinstance(auth, dict) else {}
    if not hmac.compare_digest(str(auth.get("application_token") or ""), application_token):
        raise EventRefused("wrong application_token")
    if member_id and str(auth.get("member_id") or "") != member_id:
        raise EventRefused("event from a foreign portal (member_id)")
    if domain and str(auth.get("domain") or domain).lower() != domain.lower():
        raise EventRefused("event from a foreign portal (domain)")


def _key(prefix: str, *parts: str) -> str:
    """The call's local key; also the originate's ChannelId, hence the call's linkedid."""
    return f"{prefix}-" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


class EventProcessor:
    def __init__(self, settings: Settings, store: Store, client: Any, ami_factory: Callable[[], Any],
                 log: Dict[str, Any], spawn: Callable[[Callable[[], None]], None] = None) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.ami_factory = ami_factory
        self.log = log
        self.outbox = Outbox(store, client, settings.calls.recording_url, log=log)
        # Waiting for Asterisk's answer happens off the caller of handle() (the HTTP handler must
        # answer Bitrix24 fast); tests may run it inline.
        self.spawn = spawn or (lambda fn: threading.Thread(target=fn, daemon=True).start())

    def handle(self, event: str, data: Any, event_id: str = "") -> str:
        """`event_id`: what names this very event (its POST's `ts`, an offline event's ID); the same
        event delivered again (to several PBXs' handlers, or twice) is then rung once."""
        if not isinstance(data, dict):
            raise EventRefused("event without data")
        name = event.upper()
        if name == CLICK:
            return self.click(data)
        if name == CALLBACK:
            return self.callback(data, event_id)
        raise EventRefused(f"unexpected event {event[:40]!r}")

    # -- click-to-call -------------------------------------------------------------------------
    def click(self, data: Dict[str, Any]) -> str:
        call_id = str(data.get("CALL_ID") or "")
        if not _CALL_ID.fullmatch(call_id):
            raise EventRefused("ONEXTERNALCALLSTART without a usable CALL_ID")
        user_id = str(data.get("USER_ID") or "")
        key = _key("click", call_id)
        self.log.update(call_id=call_id, key=key, user_id=user_id)
        if self.store.call(key) is not None:
            return "repeat of an event already handled"
        raw = str(data.get("PHONE_NUMBER_INTERNATIONAL") or data.get("PHONE_NUMBER") or "")
        region = self.settings.calls.region
        try:
            number = phones.dialable(raw, region, "e164")
        except phones.InvalidNumber as exc:
            number, bad = "", str(exc)
        else:
            bad = ""
        inner = phones.inner_number(str(data.get("EXTENSION") or "")) or self._inner_of(user_id)
        # A double click is judged in the claim itself: two clicks handled at once see each other.
        claim = self.store.adopt_call(key, call_id, "outgoing", number or raw[:30], str(data.get("LINE_NUMBER") or ""),
                                      inner or "", self.settings.events.click_dedup if number and inner else 0.0)
        if claim == TAKEN:
            return "repeat of an event already handled"  # here, or by another PBX on the shared store
        if bad:
            return self._fail(key, inner, "484", f"the number cannot be dialed: {bad}")
        if not inner:
            return self._fail(key, inner, "480", "the employee has no inner number in Bitrix24")
        if claim == DOUBLE_CLICK:
            return self._fail(key, inner, "603-S", "a repeated click on the same number")
        return self._ring_employee(key, inner, number, str(data.get("CRM_ENTITY_TYPE") or ""))

    def _inner_of(self, user_id: str) -> Optional[str]:
        if not user_id.isdigit():
            return None
        try:
            rows = self.client.call("user.get", {"FILTER": {"ID": user_id}}) or []
        except BitrixError as exc:
            self.log["user_lookup"] = exc.summary()
            return None
        return phones.inner_number(str(rows[0].get("UF_PHONE_INNER") or "")) if rows else None

    # -- website callback form ---------------------------------------------------------------------
    def callback(self, data: Dict[str, Any], event_id: str = "") -> str:
        """The form's event has no CALL_ID (Bitrix24 REST docs: OnExternalCallBackStart): the call is
        keyed by the number and the event's own identity, and claimed in the store at once with a
        window of `[events] click_dedup` seconds per number, across every PBX on a shared store: the
        same event again (another PBX's handler, a second delivery) or a second submission of the
        form moments later rings nobody."""
        raw = str(data.get("PHONE_NUMBER") or "")
        try:
            number = phones.dialable(raw, self.settings.calls.region, "e164")
        except phones.InvalidNumber as exc:
            raise EventRefused(f"callback form with an unusable number: {exc}") from None
        inner = self.settings.events.callback_user or self.settings.calls.default_user
        if not inner:
            raise EventRefused("set [events] callback_user or [calls] default_user for the callback form")
        now = time.time()
        key = _key("callback", number, event_id or f"{now:.6f}")
        self.log.update(key=key, number=number, user=inner)
        crm_type = str(data.get("CRM_ENTITY_TYPE") or "").upper()
        crm_id = str(data.get("CRM_ENTITY_ID") or "")
        line = str(data.get("LINE_NUMBER") or "")
        register = payloads.register(
            USER_PHONE_INNER=inner, PHONE_NUMBER=number, TYPE=payloads.CallType.CALLBACK,
            CALL_START_DATE=payloads.iso(now), CRM_CREATE=int(self.settings.calls.crm_create),
            CRM_ENTITY_TYPE=crm_type if crm_type in ("CONTACT", "COMPANY", "LEAD") and crm_id.isdigit() else None,
            CRM_ENTITY_ID=int(crm_id) if crm_type in ("CONTACT", "COMPANY", "LEAD") and crm_id.isdigit() else None,
            LINE_NUMBER=line or None, EXTERNAL_CALL_ID=key, SHOW=1)
        if self.store.start_callback(key, number, line, inner, register, self.outbox.owner, LEASE,
                                     self.settings.events.click_dedup) is None:
            return "repeat of a callback request"  # here, or by another PBX on the shared store
        self.outbox.deliver_call(key, Deadline(10.0))
        return self._ring_employee(key, inner, number, crm_type)

    # -- shared ------------------------------------------------------------------------------------
    def _ring_employee(self, key: str, inner: str, number: str, crm_type: str) -> str:
        ami = self.ami_factory()
        try:
            status, _ = ami.extension_state(inner, self.settings.dialer.hint_context)
        except Exception as exc:
            return self._fail(key, inner, "480", f"Asterisk cannot be asked (AMI): {exc}")
        if status == 4:
            return self._fail(key, inner, "480", "the employee's phone is offline (unregistered)")
        channel = self.settings.asterisk.phone_channel.replace("{inner}", inner)
        try:
            pending = ami.originate(channel, context=CONTEXT, exten="s",
                                    timeout_ms=self.settings.dialer.ring_timeout * 1000,
                                    caller_id=f'"{number}" <{number}>', variables={"BITRIX_CLICK": key},
                                    channel_id=key)
        except Exception as exc:
            return self._fail(key, inner, "480", f"Asterisk refused the call: {exc}")
        self.log["originated"] = channel

        def _await() -> None:
            try:
                result = pending.wait(self.settings.dialer.ring_timeout + 15)
            except Exception as exc:
                self._fail_later(key, inner, "480", f"no answer from Asterisk: {exc}")
                return
            if not result.success:
                code, reason = _EMPLOYEE_FAILED.get(result.reason, ("480", f"Reason {result.reason}"))
                self._fail_later(key, inner, code, reason)

        self.spawn(_await)
        return f"ringing {channel}"

    def _fail(self, key: str, inner: Optional[str], code: str, reason: str) -> str:
        """Finish the CALL_ID with a failure: the card must not hang in Bitrix24."""
        user = inner or self.settings.calls.default_user
        finish = {"USER_PHONE_INNER": user, "DURATION": 0, "STATUS_CODE": code, "FAILED_REASON": reason}
        self.store.queue_finish(key, finish, None, self.outbox.owner, LEASE)
        self.outbox.deliver_call(key, Deadline(10.0))
        self.log["failed"] = reason
        return f"not dialed: {reason}"

    def _fail_later(self, key: str, inner: Optional[str], code: str, reason: str) -> None:
        """From the waiting thread: its own database connection (sqlite3 objects stay in their thread)."""
        store = open_store(self.settings)
        try:
            EventProcessor(self.settings, store, self.client, self.ami_factory, {}, self.spawn)._fail(
                key, inner, code, reason)
        finally:
            store.close()


def sweep_stale(processor: EventProcessor) -> int:
    """Finish the click-to-call calls whose setting-up process died before Asterisk answered it
    (a restart of `serve` or the worker): their CALL_ID must not hang in Bitrix24."""
    settings = processor.settings
    limit = time.time() - (settings.dialer.ring_timeout + settings.asterisk.dial_timeout + 120)
    stale = processor.store.stale_clicks(limit)
    for row in stale:
        processor._fail(row["linkedid"], row["user_inner"] or None, "480",
                        "the call was not completed: agi-bitrix stopped while setting it up")
    return len(stale)


def bind_events(client: Any, settings: Settings) -> List[str]:
    """Bind click-to-call and the callback form (after install or auth). Returns what was bound."""
    done = []
    for event in BOUND_EVENTS:
        params: Dict[str, Any] = {"event": event}
        if settings.events.delivery == "offline":
            params["event_type"] = "offline"
        else:
            if not settings.events.handler_url:
                raise BitrixError("NO_HANDLER_URL", "[events] delivery = online needs [events] handler_url")
            params["handler"] = settings.events.handler_url
        try:
            client.call("event.bind", params)
        except BitrixError as exc:
            if "already binded" not in (exc.description or "").lower():
                raise
        done.append(event)
    return done


def poll_offline(client: Any, processor: EventProcessor, limit: int = 50) -> Tuple[int, List[str]]:
    """One round of `event.offline.get`: take events under a process id, handle, then clear them."""
    answer = client.call("event.offline.get", {"clear": 0, "limit": limit}) or {}
    events = answer.get("events") if isinstance(answer, dict) else None
    if not events:
        return 0, []
    outcomes = []
    for item in events:
        try:
            outcomes.append(processor.handle(str(item.get("EVENT_NAME") or ""), item.get("EVENT_DATA"),
                                             f"offline-{item.get('ID')}" if item.get("ID") else ""))
        except EventRefused as exc:
            outcomes.append(f"refused: {exc}")
    client.call("event.offline.clear", {"process_id": answer.get("process_id"),
                                        "id": [item.get("ID") for item in events]})
    return len(events), outcomes
