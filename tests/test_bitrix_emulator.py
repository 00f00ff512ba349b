"""The Bitrix24 emulator behaves like the Bitrix24 REST docs describe the portal."""
from __future__ import annotations

import base64
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
import requests

from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator, parse_php_query

from conftest import webhook_call as call

REGISTER = "telephony.externalcall.register"
FINISH = "telephony.externalcall.finish"


@pytest.fixture()
def emu() -> Iterator[Bitrix24Emulator]:
    with Bitrix24Emulator() as e:
        e.add_user("Admin", "Portal", inner="100", user_id=1)
        e.add_user("Anna", "Operator", inner="101", user_id=2)
        e.add_user("Boris", "Operator", inner="102", user_id=3, timeman_status="PAUSED")
        e.add_user("Fired", "Man", inner="199", user_id=4, active=False)
        yield e
        assert e.internal_errors == []


def register(emu: Bitrix24Emulator, **extra: Any) -> dict:
    params = {"USER_ID": 2, "PHONE_NUMBER": "+79161234567", "TYPE": 2, "EXTERNAL_CALL_ID": "ast-1"}
    params.update(extra)
    r = call(emu, REGISTER, params)
    assert r.status_code == 200, r.text
    return r.json()["result"]


def test_webhook_auth_and_envelope(emu: Bitrix24Emulator) -> None:
    r = call(emu, "scope")
    assert r.status_code == 200
    body = r.json()
    assert "telephony" in body["result"]
    assert {"start", "finish", "duration", "processing", "date_start", "date_finish",
            "operating", "operating_reset_at"} <= set(body["time"])
    bad = requests.post(f"{emu.base_url}/rest/1/wrong-code/scope.json", json={}, timeout=30)
    assert bad.status_code == 401
    assert bad.json() == {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"}
    assert requests.post(f"{emu.base_url}/rest/2/{emu.webhook_code}/scope", timeout=30).status_code == 401
    missing = call(emu, "no.such.method")
    assert (missing.status_code, missing.json()["error"]) == (404, "ERROR_METHOD_NOT_FOUND")
    # method names are case-insensitive; .json suffix optional
    assert call(emu, "Profile.json").json()["result"]["ID"] == "1"
    assert emu.requests_for("PROFILE")[0]["auth"] == "webhook"


def test_insufficient_scope() -> None:
    with Bitrix24Emulator(scopes=("basic", "user")) as e:
        r = requests.post(e.webhook_url + REGISTER, json={}, timeout=30)
        assert (r.status_code, r.json()["error"]) == (403, "insufficient_scope")


def test_call_lifecycle(emu: Bitrix24Emulator) -> None:
    emu.add_contact("Ivan Petrov", ["8 (916) 123-45-67"], assigned_by_id=2, contact_id=797)
    res = register(emu, LINE_NUMBER="line-1", CALL_START_DATE="2026-03-07T10:20:30+03:00")
    cid = res["CALL_ID"]
    assert cid.startswith("externalCall.") and len(cid.split(".")[1]) == 32
    assert (res["CRM_ENTITY_TYPE"], res["CRM_ENTITY_ID"], res["CRM_CREATED_LEAD"]) == ("CONTACT", 797, None)
    assert emu.calls[cid]["shown"] == [2]

    assert call(emu, "telephony.externalCall.show", {"CALL_ID": cid, "USER_ID": [3, 1]}).json()["result"] is True
    assert emu.calls[cid]["shown"] == [1, 2, 3]
    r = call(emu, "telephony.externalcall.hide", {"CALL_ID": cid, "USER_ID[]": ["1", "3"]}, form=True)
    assert r.json()["result"] is True
    assert call(emu, "telephony.externalcall.hide", {"CALL_ID": "nope"}).json()["result"] is False

    early = call(emu, "telephony.externalcall.attachRecord", {"CALL_ID": cid, "FILENAME": "a.mp3"})
    assert early.json()["error_description"] == (
        "Call is not found in the statistic table. It looks like it is not finished yet.")

    fin = call(emu, FINISH, {"CALL_ID": cid, "USER_PHONE_INNER": "101", "DURATION": 42})
    assert fin.status_code == 200, fin.text
    row = fin.json()["result"]
    assert (row["CALL_STATUS"], row["CALL_FAILED_CODE"], row["PORTAL_USER_ID"]) == (1, "200", 2)
    assert row["CRM_ACTIVITY_ID"] and row["PORTAL_NUMBER"] == "line-1" and row["INCOMING"] == "2"
    state = emu.calls[cid]
    assert state["finished"] and state["duration"] == 42 and state["status_code"] == "200"
    assert state["shown"] == [] and state["card_events"][-1] == ("hide", 2)
    assert call(emu, "telephony.externalcall.show", {"CALL_ID": cid}).json()["result"] is False

    audio = b"RIFF\x00\x01fake-wav"
    att = call(emu, "telephony.externalcall.attachrecord",
               {"CALL_ID": cid, "FILENAME": "rec.wav", "FILE_CONTENT": base64.b64encode(audio).decode()})
    assert att.status_code == 200 and att.json()["result"]["FILE_ID"] >= 1
    assert emu.calls[cid]["record"]["content"] == audio
    assert emu.calls[cid]["record"]["via"] == "base64"
    for params, text in [
        ({"FILENAME": "rec.ogg", "FILE_CONTENT": "AAAA"}, "Wrong file extension. Only wav and mp3 are allowed"),
        ({"FILENAME": "rec.wav", "FILE_CONTENT": "not base64!"},
         "File content is not properly encoded. Base64 encoding is expected."),
    ]:
        r = call(emu, "telephony.externalcall.attachrecord", {"CALL_ID": cid, **params})
        assert (r.status_code, r.json()["error"], r.json()["error_description"]) == (400, "ERROR_CORE", text)


def test_finish_errors(emu: Bitrix24Emulator) -> None:
    r = call(emu, FINISH, {"CALL_ID": "externalCall.x.1", "USER_ID": 2})
    assert r.status_code == 400
    assert r.json() == {"error": "ERROR_CORE",
                        "error_description": "Call is not found (call should be registered prior to finishing"}
    r = call(emu, FINISH, {"CALL_ID": 12345, "USER_ID": 2})
    assert (r.status_code, r.json()) == (400, {"error": "INVALID_ARGUMENT",
                                               "error_description": "CALL_ID must be a string"})
    cid = register(emu)["CALL_ID"]
    assert call(emu, FINISH, {"CALL_ID": cid}).json()["error_description"] == "USER_ID or USER_PHONE_INNER should be set"
    assert call(emu, FINISH, {"CALL_ID": cid, "USER_ID": 4}).json()["error_description"] == \
        "User is not found or is not active"
    ok = call(emu, FINISH, {"CALL_ID": cid, "USER_ID": 2}, form=True)
    assert ok.status_code == 200 and ok.json()["result"]["CALL_FAILED_CODE"] == "304"
    again = call(emu, FINISH, {"CALL_ID": cid, "USER_ID": 2})
    assert again.status_code == 400 and again.json()["error"] == "ERROR_CORE"


def test_register_dedup_window(emu: Bitrix24Emulator) -> None:
    now = [time.time()]
    emu.clock = lambda: now[0]
    first = register(emu)["CALL_ID"]
    assert register(emu, CALL_START_DATE="2026-01-01T00:00:00+00:00")["CALL_ID"] == first
    assert register(emu, EXTERNAL_CALL_ID="ast-2")["CALL_ID"] != first
    call(emu, FINISH, {"CALL_ID": first, "USER_ID": 2})
    assert register(emu)["CALL_ID"] == first  # strict: even after finish
    assert emu.calls[first]["register_count"] == 3
    now[0] += 31 * 60
    assert register(emu)["CALL_ID"] != first


def test_crm_create_lead_once(emu: Bitrix24Emulator) -> None:
    res = register(emu, CRM_CREATE=1, PHONE_NUMBER="+7 (903) 555-00-11")
    lead_id = res["CRM_CREATED_LEAD"]
    assert res["CRM_CREATED_ENTITIES"] == [{"ENTITY_TYPE": "LEAD", "ENTITY_ID": lead_id}]
    assert emu.leads[lead_id]["TITLE"] == "Incoming call +79035550011"
    again = register(emu, CRM_CREATE=1, PHONE_NUMBER="+7 (903) 555-00-11", EXTERNAL_CALL_ID="ast-9")
    assert again["CRM_CREATED_LEAD"] is None and again["CRM_ENTITY_ID"] == lead_id
    assert len(emu.leads) == 1
    internal = register(emu, CRM_CREATE=1, PHONE_NUMBER="102", TYPE=1)
    assert internal["CRM_CREATED_LEAD"] is None and len(emu.leads) == 1


@pytest.mark.parametrize("params,text", [
    ({"TYPE": 7}, "Unknown TYPE"),
    ({"TYPE": "incoming"}, "Unknown TYPE"),
    ({"CALL_START_DATE": "2026-03-07 10:20:30"}, "CALL_START_DATE should be in the ISO-8601 format"),
    ({"CALL_START_DATE": "2026-03-07T10:20:30"}, "CALL_START_DATE should be in the ISO-8601 format"),
    ({"CALL_START_DATE": "2026-02-30T10:20:30+03:00"}, "CALL_START_DATE should be in the ISO-8601 format"),
    ({"PHONE_NUMBER": "anonymous"}, "Unsupported phone number format"),
    ({"USER_ID": 0}, "USER_ID or USER_PHONE_INNER should be set"),
    ({"USER_ID": 0, "USER_PHONE_INNER": "555"}, "User is not found or is not active"),
    ({"USER_ID": 4}, "User is not found or is not active"),
])
def test_register_validation(emu: Bitrix24Emulator, params: dict, text: str) -> None:
    base = {"USER_ID": 2, "PHONE_NUMBER": "+79161234567", "TYPE": 2}
    r = call(emu, REGISTER, {**base, **params})
    assert (r.status_code, r.json()) == (400, {"error": "ERROR_CORE", "error_description": text})


def test_search_crm_entities_and_findbycomm(emu: Bitrix24Emulator) -> None:
    emu.add_lead("Lead", ["+79161234567"], assigned_by_id=2)
    emu.add_company("Acme", ["+7 916 123 45 67"], assigned_by_id=3)
    emu.add_contact("Ivan", ["89161234567"], assigned_by_id=3)
    rows = call(emu, "telephony.externalCall.searchCrmEntities", {"PHONE_NUMBER": "8-916-123-45-67"}).json()["result"]
    assert [r["CRM_ENTITY_TYPE"] for r in rows] == ["CONTACT", "COMPANY", "LEAD"]
    assert rows[0]["NAME"] == "Ivan" and rows[0]["ASSIGNED_BY"]["USER_PHONE_INNER"] == "102"
    assert rows[0]["ASSIGNED_BY"]["TIMEMAN_STATUS"] == "PAUSED"
    empty = call(emu, "telephony.externalcall.searchcrmentities", {"PHONE_NUMBER": ""})
    assert empty.json()["error_description"] == "PHONE_NUMBER is empty"

    dup = call(emu, "crm.duplicate.findbycomm", {"type": "PHONE", "values": ["+79161234567"]}).json()["result"]
    assert dup == {"CONTACT": [1], "COMPANY": [1], "LEAD": [1]}
    none = call(emu, "crm.duplicate.findbycomm", {"type": "PHONE", "values": ["123"]}).json()["result"]
    assert none == []
    too_many = call(emu, "crm.duplicate.findbycomm", {"type": "PHONE", "values": ["1"] * 21})
    assert too_many.status_code == 400
    contact = call(emu, "crm.contact.get", {"id": 1}).json()["result"]
    assert contact["PHONE"][0]["VALUE"] == "89161234567" and contact["ASSIGNED_BY_ID"] == "3"


def test_user_get_filters(emu: Bitrix24Emulator) -> None:
    r = call(emu, "user.get", {"FILTER": {"UF_PHONE_INNER": "101", "ACTIVE": True}}).json()
    assert [u["ID"] for u in r["result"]] == ["2"] and r["total"] == 1 and "next" not in r
    form = call(emu, "user.get", {"FILTER[UF_PHONE_INNER]": "199", "FILTER[ACTIVE]": "Y"}, form=True).json()
    assert form["result"] == []
    emu.add_user("No", "Phone", user_id=5)
    has_inner = call(emu, "user.get", {"FILTER": {"!UF_PHONE_INNER": False}}).json()["result"]
    assert [u["ID"] for u in has_inner] == ["1", "2", "3", "4"]
    by_ids = call(emu, "user.get", {"@ID": [1, 3]}).json()["result"]
    assert [u["ID"] for u in by_ids] == ["1", "3"]
    for i in range(60):
        emu.add_user(f"U{i}", inner=str(300 + i))
    page = call(emu, "user.get", {"ACTIVE": True}).json()
    assert len(page["result"]) == 50 and page["next"] == 50 and page["total"] == 64
    page2 = call(emu, "user.get", {"ACTIVE": True, "start": 50}).json()
    assert len(page2["result"]) == 14 and "next" not in page2


def test_batch(emu: Bitrix24Emulator) -> None:
    cmd = {
        "reg": f"{REGISTER}?USER_ID=2&PHONE_NUMBER=%2B79161234567&TYPE=2&SHOW=0",
        "fin": f"{FINISH}?CALL_ID=$result[reg][CALL_ID]&USER_ID=2&DURATION=5",
        "bad": f"{REGISTER}?USER_ID=2&PHONE_NUMBER=abc&TYPE=2",
        "users": "user.get?FILTER[UF_PHONE_INNER]=101",
    }
    body = call(emu, "batch", {"halt": 0, "cmd": cmd}).json()["result"]
    cid = body["result"]["reg"]["CALL_ID"]
    assert body["result"]["fin"]["CALL_ID"] == cid and emu.calls[cid]["finished"]
    assert body["result_error"]["bad"]["error_description"] == "Unsupported phone number format"
    assert body["result_total"] == {"users": 1} and body["result_next"] == []
    assert set(body["result_time"]) == {"reg", "fin", "users"}
    assert [r["batch"] for r in emu.requests_for(FINISH)] == [True]

    clean = call(emu, "batch", {"cmd": ["scope", "profile"]}).json()["result"]
    assert clean["result_error"] == [] and isinstance(clean["result"], list) and len(clean["result"]) == 2

    halted = call(emu, "batch", {"halt": 1, "cmd": ["no.such", "scope"]}).json()["result"]
    # keys 0..n-1 of an array cmd serialize as a JSON list, like PHP arrays
    assert halted["result"] == [] and halted["result_error"][0]["error"] == "ERROR_METHOD_NOT_FOUND"
    gap = call(emu, "batch", {"cmd": ["no.such", "scope"]}).json()["result"]
    assert set(gap["result"]) == {"1"} and gap["result_error"][0]["error"] == "ERROR_METHOD_NOT_FOUND"

    form = call(emu, "batch", {"cmd[a]": "user.get?ID=1"}, form=True).json()["result"]
    assert form["result"]["a"][0]["ID"] == "1"

    att = call(emu, "batch", {"cmd": {"a": f"telephony.externalcall.attachrecord?CALL_ID={cid}&FILENAME=x.mp3"}})
    assert att.json()["result"]["result_error"]["a"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"

    too_long = call(emu, "batch", {"cmd": ["scope"] * 51})
    assert (too_long.status_code, too_long.json()["error"]) == (400, "ERROR_BATCH_LENGTH_EXCEEDED")
    nested = call(emu, "batch", {"cmd": ["batch?cmd[0]=scope"]})
    assert (nested.status_code, nested.json()["error"]) == (405, "ERROR_BATCH_METHOD_NOT_ALLOWED")


def test_leaky_bucket(emu: Bitrix24Emulator) -> None:
    now = [1_800_000_000.0]
    emu.clock = lambda: now[0]
    emu.set_bucket(10, drain_per_second=2.0)
    codes = [call(emu, "scope").status_code for _ in range(13)]
    assert codes == [200] * 10 + [503] * 3 and emu.count_503 == 3
    assert call(emu, "scope").json() == {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
    now[0] += 1.0  # drains 2
    assert [call(emu, "scope").status_code for _ in range(3)] == [200, 200, 503]
    batch = call(emu, "batch", {"cmd": ["scope"] * 5})
    assert batch.status_code == 503  # a batch is one request, and it does not fit either
    emu.set_bucket(None)
    assert call(emu, "scope").status_code == 200


def test_operating_limit(emu: Bitrix24Emulator) -> None:
    reset_at = time.time() + 120
    emu.set_operating_limit("user.get", reset_at)
    r = call(emu, "user.get")
    assert (r.status_code, r.json()["error"]) == (429, "OPERATION_TIME_LIMIT")
    other = call(emu, "scope").json()
    assert other["time"]["operating_reset_at"] == int(reset_at)
    in_batch = call(emu, "batch", {"cmd": {"u": "user.get"}}).json()["result"]
    assert in_batch["result_error"]["u"]["error"] == "OPERATION_TIME_LIMIT"
    emu.set_operating_limit("user.get", None)
    assert call(emu, "user.get").status_code == 200


def test_oauth_rotation(emu: Bitrix24Emulator) -> None:
    pair = emu.issue_tokens()
    assert pair["client_endpoint"] == emu.client_endpoint and pair["server_endpoint"] == f"{emu.base_url}/oauth/"
    ok = requests.post(emu.client_endpoint + "profile", json={"auth": pair["access_token"]}, timeout=30)
    assert ok.status_code == 200 and emu.requests_for("profile")[-1]["auth"] == "oauth"
    assert "auth" not in emu.requests_for("profile")[-1]["params"]
    assert requests.post(emu.client_endpoint + "scope", timeout=30).json()["error"] == "NO_AUTH_FOUND"

    q = {"grant_type": "refresh_token", "client_id": emu.client_id, "client_secret": emu.client_secret,
         "refresh_token": pair["refresh_token"]}
    new = requests.get(emu.oauth_url, params=q, timeout=30).json()
    assert new["refresh_token"] != pair["refresh_token"] and new["expires_in"] == 3600
    assert emu.refresh_count == 1
    old = requests.get(emu.client_endpoint + "scope", params={"auth": pair["access_token"]}, timeout=30)
    assert (old.status_code, old.json()["error"]) == (401, "invalid_token")
    spent = requests.post(emu.oauth_url, data=q, timeout=30)
    assert (spent.status_code, spent.json()["error"]) == (400, "invalid_grant")
    assert emu.spent_refresh_uses == 1
    assert emu.requests_for("oauth.token")[0]["params"]["client_secret"] == "***"
    wrong = requests.get(emu.oauth_url, params={**q, "client_secret": "x"}, timeout=30)
    assert wrong.json()["error"] == "invalid_client"

    emu.expire_access_tokens()
    exp = requests.post(emu.client_endpoint + "scope.json", data={"auth": new["access_token"]}, timeout=30)
    assert (exp.status_code, exp.json()) == (401, {"error": "expired_token",
                                                  "error_description": "The access token provided has expired."})

    code = emu.authorization_code()
    cq = {"grant_type": "authorization_code", "client_id": emu.client_id,
          "client_secret": emu.client_secret, "code": code}
    assert "access_token" in requests.get(emu.oauth_url, params=cq, timeout=30).json()
    assert requests.get(emu.oauth_url, params=cq, timeout=30).json()["error"] == "invalid_grant"

    emu.revoke_app()
    revoked = requests.get(emu.oauth_url, params={**q, "refresh_token": new["refresh_token"]}, timeout=30)
    assert revoked.json()["error"] == "invalid_grant" and emu.spent_refresh_uses == 1


class _FileHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/rec.mp3":
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"ID3")
        else:
            self.send_error(404)

    def log_message(self, *args: Any) -> None:
        pass


def test_record_upload_and_url(emu: Bitrix24Emulator) -> None:
    cid = register(emu)["CALL_ID"]
    call(emu, FINISH, {"CALL_ID": cid, "USER_ID": 2, "DURATION": 3})
    res = call(emu, "telephony.externalcall.attachRecord", {"CALL_ID": cid, "FILENAME": "call.mp3"}).json()["result"]
    assert res["fieldName"] == "file" and res["uploadUrl"].startswith(emu.base_url + "/rest/upload.json?token=")
    up = requests.post(res["uploadUrl"], files={"file": ("call.mp3", b"\r\n--binary\r\n\x00")}, timeout=30)
    assert up.status_code == 200, up.text
    assert emu.calls[cid]["record"] == {"filename": "call.mp3", "content": b"\r\n--binary\r\n\x00",
                                        "via": "upload", "file_id": up.json()["result"]["FILE_ID"]}
    assert requests.post(res["uploadUrl"], files={"file": ("x.mp3", b"x")}, timeout=30).status_code == 400

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        ok = call(emu, "telephony.externalcall.attachrecord", {"CALL_ID": cid, "RECORD_URL": base + "/rec.mp3"})
        assert ok.status_code == 200 and emu.calls[cid]["record"]["content"] == b"ID3"
        missing = call(emu, "telephony.externalcall.attachrecord", {"CALL_ID": cid, "RECORD_URL": base + "/x.mp3"})
        assert missing.json()["error_description"] == "Server returns HTTP error code 404"
    finally:
        server.shutdown()
        server.server_close()


def test_faults_delay_and_restart(emu: Bitrix24Emulator) -> None:
    emu.fail_next(500, "INTERNAL_SERVER_ERROR", "boom", method=REGISTER)
    r = call(emu, REGISTER, {"USER_ID": 2, "PHONE_NUMBER": "1", "TYPE": 2})
    assert (r.status_code, r.json()["error_description"]) == (500, "boom")
    assert call(emu, REGISTER, {"USER_ID": 2, "PHONE_NUMBER": "1", "TYPE": 2}).status_code == 200
    emu.fail_next(502, "", body="<html>Bad Gateway</html>")
    assert call(emu, "scope").text == "<html>Bad Gateway</html>"
    emu.set_delay(0.3, method="scope", count=1)
    with pytest.raises(requests.Timeout):
        requests.post(emu.webhook_url + "scope", timeout=0.1)
    emu.clear_faults()
    session = requests.Session()
    assert session.post(emu.webhook_url + "scope", timeout=30).status_code == 200
    emu.stop()
    with pytest.raises(requests.ConnectionError):
        session.post(emu.webhook_url + "scope", timeout=2)
    emu.start()
    assert requests.post(emu.webhook_url + "scope", timeout=30).status_code == 200


def test_each_answer_is_one_write_on_a_kept_alive_connection(emu: Bitrix24Emulator, monkeypatch) -> None:
    """Head and body written apart cost a delayed ACK (about 40 ms) per request on a kept-alive
    connection: every answer, good or bad, goes out in one write."""
    from agi_bitrix.testing import bitrix_emulator as module

    writes: list = []
    setup = module._Handler.setup

    class Counting:
        def __init__(self, raw: Any) -> None:
            self.raw = raw

        def write(self, data: bytes) -> int:
            writes.append(data)
            return self.raw.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.raw, name)

    def counting_setup(handler: Any) -> None:
        setup(handler)
        handler.wfile = Counting(handler.wfile)

    monkeypatch.setattr(module._Handler, "setup", counting_setup)
    session = requests.Session()
    bad_hook = emu.webhook_url.replace(emu.webhook_code, "wrong")
    answers = [session.post(emu.webhook_url + "scope", json={}, timeout=30),
               session.post(bad_hook + "scope", json={}, timeout=30),
               session.post(emu.webhook_url + "batch", json={"cmd": {"a": "scope", "b": "profile"}}, timeout=30)]
    assert [a.status_code for a in answers] == [200, 401, 200]
    assert emu.connections_opened == 1  # all three on one kept-alive connection
    assert len(writes) == 3
    assert all(w.startswith(b"HTTP/1.1 ") and w.endswith(a.content) for w, a in zip(writes, answers))


def test_parse_php_query() -> None:
    parsed = parse_php_query("FILTER%5BUF_PHONE_INNER%5D=101&USER_ID[]=1&USER_ID[]=2&cmd[a]=user.get%3FID%3D1&x=")
    assert parsed == {"FILTER": {"UF_PHONE_INNER": "101"}, "USER_ID": ["1", "2"],
                      "cmd": {"a": "user.get?ID=1"}, "x": ""}
    assert parse_php_query("a[1]=x&a[0]=y") == {"a": {"1": "x", "0": "y"}}
