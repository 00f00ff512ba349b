"""The emulator's REST events: event.bind/get/unbind, offline events, click-to-call, install callback."""
from __future__ import annotations

import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
import requests

from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator

FINISH = "telephony.externalcall.finish"


class Receiver:
    """A tiny handler on loopback that keeps every POST (path, headers, form pairs)."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8")
                receiver.posts.append({"path": self.path, "ctype": self.headers.get("Content-Type"),
                                       "pairs": urllib.parse.parse_qsl(body, keep_blank_values=True)})
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, path: str = "/b24/events") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def form(self, i: int = -1) -> dict[str, str]:
        return dict(self.posts[i]["pairs"])


@pytest.fixture()
def emu() -> Iterator[Bitrix24Emulator]:
    with Bitrix24Emulator() as e:
        e.add_user("Admin", "Portal", inner="100", user_id=1)
        e.add_user("Anna", "Operator", inner="101", user_id=2)
        e.add_user("Boris", "Operator", user_id=3)
        e.add_contact("Ivan Petrov", ["+7 916 123-45-67"], assigned_by_id=2, contact_id=797)
        yield e
        assert e.internal_errors == []


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture()
def token(emu: Bitrix24Emulator) -> str:
    return emu.issue_tokens()["access_token"]


def rest(emu: Bitrix24Emulator, token: str, method: str, params: dict | None = None) -> requests.Response:
    return requests.post(emu.client_endpoint + method, json={**(params or {}), "auth": token}, timeout=30)


def ok(resp: requests.Response) -> Any:
    assert resp.status_code == 200, resp.text
    return resp.json()["result"]


def error(resp: requests.Response) -> tuple[int, str]:
    return resp.status_code, resp.json()["error"]


def test_bind_get_unbind(emu: Bitrix24Emulator, token: str) -> None:
    hook = "https://pbx.example.com/b24"
    assert ok(rest(emu, token, "event.bind", {"event": "ONEXTERNALCALLSTART", "handler": hook})) is True
    # names are case-insensitive; the same event + handler again is refused
    dup = rest(emu, token, "event.bind", {"event": "OnExternalCallStart", "handler": hook})
    assert error(dup) == (400, "ERROR_CORE") and dup.json()["error_description"] == "Handler already binded"
    assert error(rest(emu, token, "event.bind", {"event": "ONNOSUCHEVENT", "handler": hook})) == \
        (400, "ERROR_EVENT_NOT_FOUND")
    plain_http = {"event": "ONCRMLEADADD", "handler": "http://pbx.example.com/"}  # http only on loopback
    assert rest(emu, token, "event.bind", plain_http).status_code == 400
    assert rest(emu, token, "event.bind", {"event": "ONCRMLEADADD"}).status_code == 400  # online needs a handler
    assert ok(rest(emu, token, "event.bind", {"EVENT": "ONEXTERNALCALLBACKSTART", "HANDLER": "http://127.0.0.1:9/cb",
                                              "AUTH_TYPE": 2}))
    assert ok(rest(emu, token, "event.bind", {"event": "ONEXTERNALCALLSTART", "event_type": "offline"}))
    assert ok(rest(emu, token, "event.get")) == [
        {"event": "ONEXTERNALCALLSTART", "handler": hook, "auth_type": "0", "offline": 0},
        {"event": "ONEXTERNALCALLBACKSTART", "handler": "http://127.0.0.1:9/cb", "auth_type": "2", "offline": 0},
        {"event": "ONEXTERNALCALLSTART", "handler": "", "auth_type": "0", "offline": 1},
    ]
    assert emu.event_bindings[2] == {"event": "ONEXTERNALCALLSTART", "handler": "", "event_type": "offline",
                                     "auth_type": 0}
    assert ok(rest(emu, token, "event.unbind", {"event": "ONEXTERNALCALLSTART", "handler": hook})) == {"count": 1}
    assert ok(rest(emu, token, "event.unbind", {"event": "ONEXTERNALCALLSTART", "handler": hook})) == {"count": 0}
    assert [b["event_type"] for b in emu.event_bindings] == ["online", "offline"]
    # a telephony event needs the telephony scope to exist for the app
    with Bitrix24Emulator(scopes=("crm", "basic")) as bare:
        t = bare.issue_tokens()["access_token"]
        assert error(rest(bare, t, "event.bind", {"event": "ONEXTERNALCALLSTART", "handler": hook})) == \
            (400, "ERROR_EVENT_NOT_FOUND")


def test_event_methods_are_application_only(emu: Bitrix24Emulator) -> None:
    for method in ("event.bind", "event.get", "event.unbind", "event.offline.get", "event.offline.clear",
                   "event.offline.error"):
        r = requests.post(emu.webhook_url + method, json={"event": "ONEXTERNALCALLSTART",
                                                          "handler": "https://pbx.example.com/"}, timeout=30)
        assert error(r) == (403, "WRONG_AUTH_TYPE"), method
    batch = requests.post(emu.webhook_url + "batch", json={"cmd": {"b": "event.get"}}, timeout=30).json()
    assert batch["result"]["result_error"]["b"]["error"] == "WRONG_AUTH_TYPE"
    assert emu.event_bindings == []


def test_click_to_call_online(emu: Bitrix24Emulator, token: str, receiver: Receiver) -> None:
    assert ok(rest(emu, token, "telephony.externalLine.add", {"NUMBER": "line-1", "NAME": "Office"}))
    ok(rest(emu, token, "event.bind", {"event": "ONEXTERNALCALLSTART", "handler": receiver.url()}))
    data = emu.click_to_call(2, "8 (916) 123-45-67", line_number="line-1", crm=("CONTACT", 797))
    assert emu.wait_deliveries(1)
    assert data == {"PHONE_NUMBER": "8 (916) 123-45-67", "PHONE_NUMBER_INTERNATIONAL": "+79161234567",
                    "EXTENSION": "101", "USER_ID": "2", "CALL_LIST_ID": "0", "LINE_NUMBER": "line-1",
                    "IS_MOBILE": "0", "CALL_ID": data["CALL_ID"], "CRM_ENTITY_TYPE": "CONTACT",
                    "CRM_ENTITY_ID": "797"}
    post = receiver.posts[0]
    assert post["path"] == "/b24/events" and post["ctype"] == "application/x-www-form-urlencoded"
    form = receiver.form()
    assert form["event"] == "ONEXTERNALCALLSTART" and form["event_handler_id"].isdigit() and form["ts"].isdigit()
    assert {k[5:-1]: v for k, v in form.items() if k.startswith("data[")} == data
    assert form["auth[application_token]"] == emu.application_token
    assert (form["auth[member_id]"], form["auth[domain]"]) == (emu.member_id, emu.domain)
    assert (form["auth[client_endpoint]"], form["auth[expires_in]"]) == (emu.client_endpoint, "3600")
    assert "auth[refresh_token]" not in form
    assert set(emu.event_deliveries[0]) == {"url", "event", "status", "seconds", "error"}
    assert emu.event_deliveries[0]["status"] == 200 and emu.event_deliveries[0]["error"] is None

    # the portal registered the call itself (TYPE 1, the clicking user); the app never calls register
    call = emu.calls[data["CALL_ID"]]
    assert (call["type"], call["user_id"], call["line"], call["crm_entity_id"]) == (1, 2, "line-1", 797)
    assert call["shown"] == [2] and emu.requests_for("telephony.externalcall.register") == []
    # the event's token belongs to the user who clicked and works for finishing that same CALL_ID
    event_token = form["auth[access_token]"]
    assert ok(rest(emu, event_token, "profile"))["ID"] == "2"
    res = ok(rest(emu, event_token, FINISH, {"CALL_ID": data["CALL_ID"], "USER_ID": 2, "DURATION": 42}))
    assert (res["INCOMING"], res["CALL_DURATION"], res["CRM_ENTITY_TYPE"]) == ("1", 42, "CONTACT")
    assert emu.calls[data["CALL_ID"]]["finished"]
    # a second click on the same number is a new call
    again = emu.click_to_call(2, "+79161234567", is_mobile=True, call_list_id=5)
    assert again["CALL_ID"] != data["CALL_ID"] and (again["IS_MOBILE"], again["CALL_LIST_ID"]) == ("1", "5")
    assert emu.wait_deliveries(2)
    with pytest.raises(ValueError):
        emu.click_to_call(99, "+79161234567")


def test_click_to_call_crm_create_follows_line(emu: Bitrix24Emulator, token: str) -> None:
    ok(rest(emu, token, "telephony.externalLine.add", {"NUMBER": "no-crm", "CRM_AUTO_CREATE": "N"}))
    quiet = emu.click_to_call(3, "+7 495 000-00-01", line_number="no-crm")
    assert (quiet["CRM_ENTITY_TYPE"], quiet["CRM_ENTITY_ID"], quiet["EXTENSION"]) == ("", "", "")
    assert emu.leads == {}
    made = emu.click_to_call(3, "+7 495 000-00-02")  # the generic app line creates CRM items
    lead_id = int(made["CRM_ENTITY_ID"])
    assert made["CRM_ENTITY_TYPE"] == "LEAD" and emu.leads[lead_id]["SOURCE_ID"] == "CALL"
    assert emu.event_deliveries == [] and emu.offline_events == []  # nothing bound: nothing sent


def test_offline_events(emu: Bitrix24Emulator, token: str) -> None:
    ok(rest(emu, token, "event.bind", {"event": "ONEXTERNALCALLSTART", "event_type": "offline"}))
    first = emu.click_to_call(2, "+79161234567")
    assert emu.event_deliveries == [] and [e["EVENT_NAME"] for e in emu.offline_events] == ["ONEXTERNALCALLSTART"]
    got = ok(rest(emu, token, "event.offline.get"))
    assert got["process_id"] is None and len(got["events"]) == 1
    ev = got["events"][0]
    assert set(ev) == {"ID", "TIMESTAMP_X", "EVENT_NAME", "EVENT_DATA", "EVENT_ADDITIONAL", "MESSAGE_ID"}
    assert ev["EVENT_DATA"] == first and ev["ID"].isdigit() and ev["TIMESTAMP_X"].endswith("+03:00")
    assert emu.offline_events == [] and ok(rest(emu, token, "event.offline.get"))["events"] == []

    # clear=0: taken records are hidden under a process id until cleared or marked as errors
    calls = [emu.click_to_call(2, "+7916000000" + str(i))["CALL_ID"] for i in range(3)]
    a = ok(rest(emu, token, "event.offline.get", {"clear": 0, "limit": 1}))
    b = ok(rest(emu, token, "event.offline.get", {"clear": 0, "limit": 1}))
    assert a["process_id"] and b["process_id"] and a["process_id"] != b["process_id"]
    assert [e["EVENT_DATA"]["CALL_ID"] for e in a["events"] + b["events"]] == calls[:2]
    assert [e["PROCESS_ID"] for e in emu.offline_events] == [a["process_id"], b["process_id"], None]
    assert ok(rest(emu, token, "event.offline.clear", {"process_id": a["process_id"]})) is True
    assert ok(rest(emu, token, "event.offline.error", {"process_id": b["process_id"],
                                                       "message_id": [b["events"][0]["MESSAGE_ID"]]})) is True
    rest_ = ok(rest(emu, token, "event.offline.get", {"clear": 0}))
    assert [e["EVENT_DATA"]["CALL_ID"] for e in rest_["events"]] == [calls[2]]
    ok(rest(emu, token, "event.offline.clear", {"process_id": rest_["process_id"], "id": [rest_["events"][0]["ID"]]}))
    errored = ok(rest(emu, token, "event.offline.get", {"error": 1, "filter": {"=EVENT_NAME": "ONEXTERNALCALLSTART"}}))
    assert [e["EVENT_DATA"]["CALL_ID"] for e in errored["events"]] == [calls[1]] and emu.offline_events == []

    assert rest(emu, token, "event.offline.get", {"filter": {"=USER_ID": 2}}).status_code == 400
    assert rest(emu, token, "event.offline.clear", {}).status_code == 400  # process_id is required


def test_callback_request(emu: Bitrix24Emulator, token: str, receiver: Receiver) -> None:
    ok(rest(emu, token, "event.bind", {"event": "ONEXTERNALCALLBACKSTART", "handler": receiver.url("/cb")}))
    data = emu.callback_request("+79161234567", text="Call me", crm=("CONTACT", 797), line_number="line-1")
    assert data == {"PHONE_NUMBER": "+79161234567", "TEXT": "Call me", "VOICE": "", "CRM_ENTITY_TYPE": "CONTACT",
                    "CRM_ENTITY_ID": "797", "LINE_NUMBER": "line-1"}
    assert emu.wait_deliveries(1)
    form = receiver.form()
    assert form["event"] == "ONEXTERNALCALLBACKSTART" and "data[CALL_ID]" not in form
    assert data == {k[5:-1]: v for k, v in form.items() if k.startswith("data[")}
    # a site visitor is no user: no tokens, only the portal/app identity
    assert "auth[access_token]" not in form and form["auth[application_token]"] == emu.application_token
    assert emu.calls == {}


def test_install_app(emu: Bitrix24Emulator, token: str, receiver: Receiver) -> None:
    ok(rest(emu, token, "event.bind", {"event": "ONEXTERNALCALLSTART", "handler": receiver.url()}))
    assert emu.install_app(receiver.url("/install")) == 200
    assert emu.event_bindings == []  # (re)installing drops the old bindings: the installer binds again
    form = receiver.form()
    assert receiver.posts[0]["path"] == "/install" and form["event"] == "ONAPPINSTALL"
    assert form["auth[application_token]"] == emu.application_token and form["auth[member_id]"] == emu.member_id
    assert {"auth[access_token]", "auth[refresh_token]", "auth[expires_in]", "auth[scope]", "auth[domain]",
            "auth[server_endpoint]", "auth[client_endpoint]", "auth[status]"} <= set(form)
    assert ok(rest(emu, form["auth[access_token]"], "profile"))["ID"] == "1"
    refreshed = requests.get(emu.oauth_url, params={"grant_type": "refresh_token", "client_id": emu.client_id,
                                                    "client_secret": emu.client_secret,
                                                    "refresh_token": form["auth[refresh_token]"]}, timeout=30)
    assert refreshed.status_code == 200 and refreshed.json()["member_id"] == emu.member_id
    receiver.status = 500
    assert emu.install_app(receiver.url("/install")) == 500
    with pytest.raises(ValueError):
        emu.install_app("https://pbx.example.com/install")


def test_post_event_is_delivered_as_given(emu: Bitrix24Emulator, receiver: Receiver) -> None:
    status = emu.post_event(receiver.url(), "ONEXTERNALCALLSTART", {"CALL_ID": "externalCall.x.1", "USER_ID": 2},
                            application_token="forged", auth_extra={"domain": None, "access_token": "bogus"})
    assert status == 200
    form = receiver.form()
    assert form["auth[application_token]"] == "forged" and form["auth[access_token]"] == "bogus"
    assert "auth[domain]" not in form and form["data[USER_ID]"] == "2"
    emu.post_event(receiver.url(), "ONAPPUNINSTALL", {"CLEAN": 0}, member_id="someone-else")
    assert receiver.form()["auth[member_id]"] == "someone-else"
    assert receiver.form()["auth[application_token]"] == emu.application_token
    assert emu.event_deliveries == []  # forged posts are not portal deliveries


def test_failed_delivery_is_recorded_not_retried(emu: Bitrix24Emulator, token: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/gone"
    ok(rest(emu, token, "event.bind", {"event": "ONEXTERNALCALLSTART", "handler": dead}))
    emu.click_to_call(2, "+79161234567")
    assert emu.wait_deliveries(1)
    (delivery,) = emu.event_deliveries
    assert delivery["url"] == dead and delivery["status"] is None and delivery["error"]
    assert not emu.wait_deliveries(2, timeout=0.2)
