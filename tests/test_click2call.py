"""Click-to-call and the website callback form, through `agi-bitrix serve` / `worker`, the fake AMI,
the dialplan's AGI steps and the Bitrix24 emulator (OAuth application)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import ENTRY, STEP_BUDGET
from agi_bitrix.testing.fake_ami import FakeAMI, OriginateOutcome, originate_variables


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Desk:
    """The PBX with an OAuth application, an AMI, and the click-to-call dialplan."""

    def __init__(self, pbx, emulator, ami, delivery: str) -> None:
        self.pbx, self.emu, self.ami = pbx, emulator, ami
        self.port = free_port()
        pbx.values["bitrix24"] = {"portal_url": emulator.base_url, "client_id": emulator.client_id,
                                  "client_secret": emulator.client_secret, "oauth_url": emulator.oauth_url,
                                  "timeout": STEP_BUDGET}
        pbx.values["asterisk"].update(ami_port=str(ami.port), ami_user=ami.username, ami_secret=ami.secret)
        pbx.values["events"] = {"delivery": delivery, "listen": f"127.0.0.1:{self.port}",
                                "handler_url": f"http://127.0.0.1:{self.port}/", "click_dedup": "60"}
        pbx.values["dialer"] = {"ring_timeout": "10"}
        pbx.write()
        self.client_status = "ANSWER"
        self.runs = []
        self.procs = []
        ami.on_originate(self._decide)
        self.script = {}

    def _decide(self, action):
        for needle, outcome in self.script.items():
            if needle in (action.get("Channel") or ""):
                return outcome
        return OriginateOutcome(reason=4, on_answer=lambda: self.dialplan(action))

    def dialplan(self, action) -> None:
        """[bitrix-click2call]: the employee answered; dial the client; then the call ends."""
        lid = action.get("ChannelId")
        run = self.pbx.run(["click-answered"], linkedid=lid, uniqueid=lid, context="bitrix-click2call",
                           variables=dict(originate_variables(action)), channel=action.get("Channel") + "-01")
        self.runs.append(run)
        if not run.set_variables.get("BITRIX_DIAL"):
            return
        if self.client_status == "ANSWER":
            self.pbx.run(["answer"], linkedid=lid, channel="PJSIP/provider-000000a1")
            self.pbx.advance(2.5)   # the talk, on a clock the test moves
            self.pbx.run(["hangup", "ANSWER", "2"], linkedid=lid, dead=True)
        else:
            self.pbx.run(["hangup", self.client_status, ""], linkedid=lid, dead=True)

    def start(self, *args: str) -> subprocess.Popen:
        env = dict(os.environ, AGI_BITRIX_SETTINGS=str(self.pbx.settings_file))
        env.pop("AST_AGI_DIR", None)
        proc = subprocess.Popen([str(ENTRY), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        return proc

    def serve(self) -> None:
        proc = self.start("serve")
        assert proc.stdout.readline().startswith("listening"), proc.stderr.read()
        assert self.emu.install_app(f"http://127.0.0.1:{self.port}/") == 200

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    def until(self, done, what: str, timeout: float = 60.0) -> None:
        """Synchronisation only: wait until something that must happen has happened."""
        end = time.time() + timeout
        while not done():
            assert time.time() < end, f"{what} never happened; log: {self.pbx.log()[-3:]}"
            time.sleep(0.05)

    def finished(self, call_id: str, timeout: float = 60.0) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            call = self.emu.calls.get(call_id)
            if call and call["finished"]:
                return call
            time.sleep(0.05)
        raise AssertionError(f"{call_id} was not finished; log: {self.pbx.log()[-3:]}")


def _desk(pbx, emulator):
    with FakeAMI(username="crm", secret="ami-secret-2") as ami:
        made = Desk(pbx, emulator, ami, "online")
        yield made
        made.stop()


@pytest.fixture
def desk(service_pbx, emulator):
    """Online events; `serve` not started yet (a test may change its settings first). The dialplan's
    steps are served by the service in this process (the first test runs them as processes too)."""
    yield from _desk(service_pbx, emulator)


@pytest.fixture
def online(desk):
    desk.serve()
    return desk


@pytest.fixture
def any_online(any_pbx, emulator):
    for desk in _desk(any_pbx, emulator):
        desk.serve()
        yield desk


def test_click_to_call_answered_finishes_the_same_call_id(any_online, emulator):
    online = any_online
    data = emulator.click_to_call(emulator.people["101"], "8 (916) 765-43-21")
    call = online.finished(data["CALL_ID"])
    assert call["status_code"] == "200" and call["duration"] == 2
    assert call["finish_user_id"] == emulator.people["101"]
    originate = online.ami.originates[0]
    assert originate.get("Channel") == "PJSIP/101" and originate.get("Context") == "bitrix-click2call"
    assert online.runs[0].set_variables["BITRIX_DIAL"] == "PJSIP/+79167654321@provider"
    assert emulator.requests_for("telephony.externalcall.register") == []  # never a second register
    assert len(emulator.calls) == 1


def test_busy_client(online, emulator):
    online.client_status = "BUSY"
    data = emulator.click_to_call(emulator.people["102"], "+79167654322")
    call = online.finished(data["CALL_ID"])
    assert call["status_code"] == "486" and call["finish_user_id"] == emulator.people["102"]


def test_employee_does_not_answer(online, emulator):
    online.script["PJSIP/103"] = OriginateOutcome(reason=3)
    data = emulator.click_to_call(emulator.people["103"], "+79167654323")
    call = online.finished(data["CALL_ID"])
    assert call["status_code"] == "304" and "did not answer" in call["finish"]["FAILED_REASON"]


def test_duplicate_click_dials_once(online, emulator):
    first = emulator.click_to_call(emulator.people["101"], "+79167654324")
    online.until(lambda: online.ami.originates, "the first click's originate")
    second = emulator.click_to_call(emulator.people["101"], "+79167654324")
    repeat = online.finished(second["CALL_ID"])
    assert repeat["status_code"] == "603-S" and "repeated click" in repeat["finish"]["FAILED_REASON"]
    online.finished(first["CALL_ID"])
    assert len(online.ami.originates) == 1


def test_forged_events_are_refused(online, emulator):
    url = f"http://127.0.0.1:{online.port}/"
    data = {"CALL_ID": "externalCall.forged.1", "USER_ID": str(emulator.people["101"]),
            "PHONE_NUMBER_INTERNATIONAL": "+79160000000"}
    assert emulator.post_event(url, "ONEXTERNALCALLSTART", data, application_token="wrong") == 403
    assert emulator.post_event(url, "ONEXTERNALCALLSTART", data, member_id="someone-else") == 403
    # Genuine, but malformed: accepted by the handler, refused by the processing.
    assert emulator.post_event(url, "ONEXTERNALCALLSTART", {"CALL_ID": "x\ny", "USER_ID": "1"}) == 200
    online.until(lambda: "without a usable CALL_ID" in online.pbx.log_text(), "the malformed event's refusal")
    assert online.ami.originates == []
    refused = [e for e in online.pbx.log() if e["event"] == "event_refused"]
    assert len(refused) == 2 and emulator.application_token not in online.pbx.log_text()
    assert any("without a usable CALL_ID" in (e.get("reason") or "") for e in online.pbx.log())


def test_employee_without_inner_number_and_a_hostile_number(online, emulator):
    emulator.set_user(emulator.people["103"], inner="")
    data = emulator.click_to_call(emulator.people["103"], "+79167654325")
    call = online.finished(data["CALL_ID"])
    assert call["status_code"] == "480" and "no inner number" in call["finish"]["FAILED_REASON"]
    url = f"http://127.0.0.1:{online.port}/"
    hostile = {"CALL_ID": emulator.click_to_call(emulator.people["101"], "+79167654326")["CALL_ID"]}
    online.finished(hostile["CALL_ID"])  # the real click went through
    data = {"CALL_ID": "externalCall.bad.2", "USER_ID": str(emulator.people["101"]), "EXTENSION": "101",
            "PHONE_NUMBER_INTERNATIONAL": "100&PJSIP/evil", "PHONE_NUMBER": "100&PJSIP/evil"}
    assert emulator.post_event(url, "ONEXTERNALCALLSTART", data) == 200
    online.until(lambda: "cannot be dialed" in online.pbx.log_text(), "the hostile number's refusal")
    assert [o.get("Channel") for o in online.ami.originates] == ["PJSIP/101"]
    assert any("cannot be dialed" in (e.get("failed") or "") for e in online.pbx.log())


def test_callback_form_rings_an_employee_then_the_visitor(online, emulator):
    emulator.callback_request("+7 903 555-12-12", text="Перезвоните мне")
    deadline = time.time() + 60
    while time.time() < deadline and not any(c["finished"] for c in emulator.calls.values()):
        time.sleep(0.05)
    call = next(iter(emulator.calls.values()))
    assert call["type"] == 4 and call["register"]["PHONE_NUMBER"] == "+79035551212"
    assert call["finished"] and call["status_code"] == "200" and call["user_id"] == emulator.people["101"]


def test_the_callback_event_delivered_again_to_serve_is_one_request(desk, emulator):
    """The same event (its `ts`) posted twice to `agi-bitrix serve`: one call, with no repeat window
    at all; another event for the number is a new call."""
    desk.pbx.set("events", "click_dedup", "0")
    desk.serve()
    url = f"http://127.0.0.1:{desk.port}/"
    data = callback_form("+7 903 555-12-15")

    def outcomes():
        return [line.get("outcome") for line in desk.pbx.log() if line["event"] == "onexternalcallbackstart"]

    for n, ts in enumerate((1795660000, 1795660000, 1795660001), 1):
        assert emulator.post_event(url, "ONEXTERNALCALLBACKSTART", data, ts=ts) == 200
        desk.until(lambda: len(outcomes()) == n, f"the handler to take event {n}")
    assert outcomes() == ["ringing PJSIP/101", "repeat of a callback request", "ringing PJSIP/101"]
    registers = emulator.requests_for("telephony.externalcall.register")
    assert [r["params"]["PHONE_NUMBER"] for r in registers] == ["+79035551215"] * 2
    assert len(desk.ami.originates) == 2


def test_offline_events_through_the_worker(pbx, emulator):
    with FakeAMI(username="crm", secret="ami-secret-3") as ami:
        desk = Desk(pbx, emulator, ami, "offline")
        res = pbx.cli("auth", "--code", stdin=emulator.authorization_code())
        assert res.returncode == 0 and "events bound (offline)" in res.stdout, res.stdout + res.stderr
        data = emulator.click_to_call(emulator.people["102"], "+79167654327")
        assert emulator.offline_events
        desk.start("worker", "--interval", "0.2")
        try:
            call = desk.finished(data["CALL_ID"])
        finally:
            desk.stop()
        assert call["status_code"] == "200" and not emulator.offline_events


def test_employee_phone_offline(online, emulator):
    online.ami.set_extension_state("102", 4)
    data = emulator.click_to_call(emulator.people["102"], "+79167654329")
    call = online.finished(data["CALL_ID"])
    assert call["status_code"] == "480" and "offline" in call["finish"]["FAILED_REASON"]
    assert online.ami.originates == []


def test_click_left_half_set_up_is_finished_by_the_worker(online, emulator):
    """`serve` dies before Asterisk says whether the employee answered: the worker closes the CALL_ID."""
    import sqlite3

    online.script["PJSIP/101"] = OriginateOutcome(reason=3, delay=60.0)  # Asterisk never tells, in time
    data = emulator.click_to_call(emulator.people["101"], "+79167654330")
    deadline = time.time() + 60
    while time.time() < deadline and not online.ami.originates:
        time.sleep(0.05)
    online.procs[0].send_signal(signal.SIGKILL)
    online.procs[0].wait(60)
    db = sqlite3.connect(str(online.pbx.state_dir / "agi-bitrix.sqlite3"))
    db.execute("UPDATE calls SET started_at = started_at - 3600")  # as if an hour went by
    db.commit()
    db.close()
    online.start("worker", "--interval", "0.2")
    call = online.finished(data["CALL_ID"])
    assert call["status_code"] == "480" and "stopped while setting it up" in call["finish"]["FAILED_REASON"]


class Clock:
    """This process's time.time(), which the handler and the store read, moved by the test."""

    def __init__(self, monkeypatch) -> None:
        self.real, self.offset = time.time, 0.0
        monkeypatch.setattr(time, "time", lambda: self.real() + self.offset)

    def set(self, at: float) -> None:
        self.offset = at - self.real()

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def callback_handler(pbx, ami, window: str = "60", event: str = "ONEXTERNALCALLBACKSTART"):
    """PBX `pbx`'s handler of the callback form's event (or `event`) in this process, ringing through
    `ami`, with [events] click_dedup = `window`: handle(data, event_id) -> its outcome. Each call
    opens its own store, as each event does."""
    from agi_bitrix import settings as settings_mod
    from agi_bitrix.bitrix.factory import make_client
    from agi_bitrix.events import EventProcessor
    from agi_bitrix.pbx.ami import AMIClient
    from agi_bitrix.stores import open_store

    pbx.values["asterisk"].update(ami_port=str(ami.port), ami_user=ami.username, ami_secret=ami.secret)
    pbx.values.setdefault("events", {})["click_dedup"] = window
    pbx.write()
    settings = settings_mod.load(str(pbx.settings_file))

    def handle(data, event_id: str) -> str:
        store = open_store(settings)
        client = AMIClient("127.0.0.1", ami.port, ami.username, ami.secret)
        try:
            return EventProcessor(settings, store, make_client(settings), lambda: client, {},
                                  spawn=lambda fn: fn()).handle(event, data, event_id)
        finally:
            client.close()
            store.close()

    return handle


def next_boundary(seconds: float) -> float:
    """Where a fixed time bucket of `seconds` would end: a repeat on either side of it is one request."""
    return (int(time.time() // seconds) + 1) * seconds


def callback_form(phone: str) -> dict:
    """ONEXTERNALCALLBACKSTART's data for a visitor who left `phone` (Bitrix24 REST docs)."""
    return {"PHONE_NUMBER": phone, "TEXT": "", "VOICE": "", "CRM_ENTITY_TYPE": "", "CRM_ENTITY_ID": "",
            "LINE_NUMBER": ""}


@pytest.mark.parametrize("events, after_window", [
    # The same event delivered again (a second delivery, or the worker and the handler both took
    # it): moments later, and long after the window, it is the one request.
    (["ts-1795630000", "ts-1795630000", "ts-1795630000"], "repeat of a callback request"),
    # The visitor sent the form twice (two events): one call within [events] click_dedup; after
    # it, a new request is a new call.
    (["ts-1795630000", "ts-1795630010", "ts-1795630071"], "ringing PJSIP/101"),
], ids=["one-event-delivered-again", "form-sent-again"])
def test_a_callback_request_repeated_rings_the_visitor_once(events, after_window, pbx, emulator, monkeypatch):
    """The repeat moments later falls across where a fixed time bucket would end: still a repeat."""
    clock = Clock(monkeypatch)
    data = callback_form("8 903 555-12-12")
    with FakeAMI(username="crm", secret="ami-secret-4") as ami:
        handle = callback_handler(pbx, ami)
        clock.set(next_boundary(60) - 5)
        assert handle(data, events[0]) == "ringing PJSIP/101"
        clock.advance(10)
        assert handle(data, events[1]) == "repeat of a callback request"
        clock.advance(61)  # past [events] click_dedup = 60
        assert handle(data, events[2]) == after_window
    rung = 1 if after_window.startswith("repeat") else 2
    assert len({o.get("ChannelId") for o in ami.originates}) == len(ami.originates) == rung
    registers = emulator.requests_for("telephony.externalcall.register")
    assert [r["params"]["PHONE_NUMBER"] for r in registers] == ["+79035551212"] * rung


def test_a_double_click_whose_two_events_are_handled_at_once_rings_the_employee_once(pbx, emulator, monkeypatch):
    """Two clicks on the same number moments apart, their events handled at the same moment by two
    threads, each past its claim before the other looks: one rings, the other is the repeated click
    (not both refused, as when each looked for the other after both had claimed)."""
    from agi_bitrix.store import Store

    clicks = [emulator.click_to_call(emulator.people["101"], "+79167654340") for _ in range(2)]
    with FakeAMI(username="crm", secret="ami-secret-5") as ami:
        handle = callback_handler(pbx, ami, event="ONEXTERNALCALLSTART")
        outcomes = clicks_taken_at_once(monkeypatch, Store, [handle, handle], clicks)
    assert sorted(outcomes) == ["not dialed: a repeated click on the same number", "ringing PJSIP/101"]
    assert len(ami.originates) == 1


def clicks_taken_at_once(monkeypatch, store_class, handlers, clicks) -> list:
    """Each click's event taken by its handler in a thread of its own, both threads past claiming
    their CALL_ID (`store_class.adopt_call`) before either goes on: their outcomes."""
    import threading

    claimed = threading.Barrier(len(clicks))
    adopt = store_class.adopt_call

    def adopt_then_meet(self, *args, **kw):
        result = adopt(self, *args, **kw)
        claimed.wait(60)
        return result

    monkeypatch.setattr(store_class, "adopt_call", adopt_then_meet)
    outcomes = [""] * len(clicks)

    def take(i: int) -> None:
        outcomes[i] = handlers[i](clicks[i], "")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(clicks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes
