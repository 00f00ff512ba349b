"""The emulator's auto-dialer surface: workgroups, tasks, comments, notifications, workday, external
lines, as the Bitrix24 REST docs describe them (tasks, workgroups, im, timeman, telephony)."""
from __future__ import annotations

import urllib.parse
from datetime import datetime, timezone
from typing import Any, Iterator

import pytest
import requests

from agi_bitrix.testing.bitrix_emulator import PORTAL_TZ, Bitrix24Emulator

from conftest import webhook_call as call

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=PORTAL_TZ).timestamp()
SELECT = ["ID", "TITLE", "RESPONSIBLE_ID", "DEADLINE", "STATUS", "GROUP_ID", "UF_CRM_TASK"]


@pytest.fixture()
def emu() -> Iterator[Bitrix24Emulator]:
    with Bitrix24Emulator() as e:
        e.clock = lambda: NOW
        e.add_user("Admin", "Portal", inner="100", user_id=1)
        e.add_user("Anna", "Operator", inner="101", user_id=2)
        e.add_user("Boris", "Operator", inner="102", user_id=3, timeman_status="PAUSED")
        e.add_user("Vera", "Operator", inner="103", user_id=4, online=False)
        e.add_user("Fired", "Man", inner="199", user_id=5, active=False)
        yield e
        assert e.internal_errors == []


def result(emu: Bitrix24Emulator, method: str, params: Any = None, **kw: Any) -> Any:
    r = call(emu, method, params, **kw)
    assert r.status_code == 200, r.text
    return r.json()["result"]


def err(r: requests.Response) -> tuple[int, str, str]:
    body = r.json()
    return r.status_code, body["error"], body["error_description"]


def seed(emu: Bitrix24Emulator) -> None:
    emu.add_group("CallCenter", [2, 3, 4], owner_id=1)  # id 1
    emu.add_group("Sales", [3], group_id=2)
    emu.add_contact("Ivan", ["+79161234567"], assigned_by_id=2, contact_id=12, fields={"UF_CRM_DNC": "1"})
    emu.add_company("Acme", ["+74951234567"], assigned_by_id=3, company_id=12)
    emu.add_task("Call the client", 2, group_id=1, deadline="2026-03-10T10:00:00+03:00", crm=["C_12"],
                 task_id=101)
    emu.add_task("Call the client back", 3, group_id=1, deadline=datetime(2026, 3, 10, 8, 30, tzinfo=timezone.utc),
                 task_id=102)
    emu.add_task("Call tomorrow", 2, group_id=1, deadline="2026-03-11T09:00:00", status=3, crm=["CO_12"],
                 task_id=103)
    emu.add_task("Done call", 2, group_id=1, deadline="2026-03-09T09:00:00+03:00", status=5, task_id=104)
    emu.add_task("Personal", 2, deadline="2026-03-10T18:00:00+03:00", task_id=105)
    emu.add_task("Sales call", 3, group_id=2, deadline="2026-03-10T09:00:00+03:00", task_id=106)
    emu.add_task("Call some day", 4, group_id=1, task_id=107)


def ids(rows: list[dict]) -> list[int]:
    return [int(r["id"]) for r in rows]


def test_groups_by_name_and_members(emu: Bitrix24Emulator) -> None:
    cc = emu.add_group("CallCenter", [2, 3, 4, 5], owner_id=1, moderator_ids=[2])
    emu.add_group("Sales", [3], group_id=7)
    assert cc["MEMBERS"] == {1: "A", 2: "E", 3: "K", 4: "K", 5: "K"} and emu.groups[7]["OWNER_ID"] == "3"
    body = call(emu, "sonet_group.get", {"FILTER": {"NAME": "CallCenter"}}).json()
    assert body["total"] == 1
    row = body["result"][0]
    assert {k: row[k] for k in ("ID", "NAME", "OWNER_ID", "NUMBER_OF_MEMBERS", "ACTIVE", "CLOSED", "PROJECT",
                                "VISIBLE", "OPENED")} == {
        "ID": "1", "NAME": "CallCenter", "OWNER_ID": "1", "NUMBER_OF_MEMBERS": "5", "ACTIVE": "Y",
        "CLOSED": "N", "PROJECT": "N", "VISIBLE": "Y", "OPENED": "N"}
    assert result(emu, "sonet_group.get", {"FILTER": {"NAME": "Callcenter"}}) == []  # NAME is exact
    assert [g["ID"] for g in result(emu, "sonet_group.get", {"FILTER": {"%NAME": "a"}})] == ["7", "1"]  # ID DESC
    form = result(emu, "sonet_group.get", {"FILTER[%NAME]": "center", "FILTER[ACTIVE]": "Y", "ORDER[ID]": "ASC",
                                           "IS_ADMIN": "Y"}, form=True)
    assert [g["NAME"] for g in form] == ["CallCenter"]

    members = result(emu, "sonet_group.user.get", {"ID": 1})
    assert members == [{"USER_ID": "1", "ROLE": "A"}, {"USER_ID": "2", "ROLE": "E"},
                       {"USER_ID": "3", "ROLE": "K"}, {"USER_ID": "4", "ROLE": "K"}]  # the fired user is left out
    for params, text in [({}, "Wrong socialnetwork group ID"), ({"ID": 99}, "Socialnetwork group not found")]:
        r = call(emu, "sonet_group.user.get", params)
        assert (r.status_code, r.json()) == (400, {"error": "", "error_description": text})
    with pytest.raises(ValueError):
        emu.add_group("Sales", [2])
    with pytest.raises(ValueError):
        emu.add_group("Ghosts", [42])


def test_task_list_filters_select_order(emu: Bitrix24Emulator) -> None:
    seed(emu)
    body = call(emu, "tasks.task.list", {
        "filter": {"GROUP_ID": 1, "!REAL_STATUS": [5, 6], "<=DEADLINE": "2026-03-10T23:59:59+03:00"},
        "select": SELECT, "order": {"DEADLINE": "asc", "ID": "asc"}}).json()
    assert body["total"] == 2 and "next" not in body
    first, second = body["result"]["tasks"]
    assert first == {"id": "101", "title": "Call the client", "responsibleId": "2",
                     "deadline": "2026-03-10T10:00:00+03:00", "status": "2", "groupId": "1", "ufCrmTask": ["C_12"]}
    # a UTC deadline comes back in portal time; an empty binding is false
    assert second["deadline"] == "2026-03-10T11:30:00+03:00" and second["ufCrmTask"] is False

    plain = result(emu, "tasks.task.list", {"filter": {"ID": 101}})["tasks"][0]
    assert "ufCrmTask" not in plain and plain["subStatus"] == "-1"  # overdue: NOW is 12:00
    assert {"createdBy", "changedDate", "responsibleId", "groupId"} <= set(plain)
    star = result(emu, "tasks.task.list", {"filter": {"ID": 101}, "select": ["*"]})["tasks"][0]
    assert "ufCrmTask" not in star
    only = result(emu, "tasks.task.list", {"filter": {"ID": 103}, "select": ["UF_CRM_TASK"]})["tasks"]
    assert only == [{"id": "103", "ufCrmTask": ["CO_12"]}]

    def listed(flt: dict, **extra: Any) -> list[int]:
        return ids(result(emu, "tasks.task.list", {"filter": flt, "select": ["ID"], "order": {"ID": "asc"},
                                                   **extra})["tasks"])

    assert listed({"GROUP_ID": 0}) == [105]
    assert result(emu, "tasks.task.list", {"filter": {"ID": 105}})["tasks"][0]["groupId"] == "0"
    assert listed({"STATUS": -1}) == [101, 102, 106]
    assert listed({"REAL_STATUS": [2, 3], "GROUP_ID": 1}) == [101, 102, 103, 107]
    assert listed({"!REAL_STATUS": 2}) == [103, 104]
    assert listed({"UF_CRM_TASK": "C_12"}) == [101]  # C_ is not CO_
    assert listed({"UF_CRM_TASK": ["CO_12", "L_1"]}) == [103]
    assert listed({">DEADLINE": "2026-03-10T11:30:00+03:00"}) == [103, 105]
    assert listed({">=DEADLINE": "2026-03-10T08:30:00+00:00"}) == [102, 103, 105]
    assert listed({"<DEADLINE": "2026-03-10T10:00:00+03:00"}) == [104, 106]
    assert listed({"DEADLINE": ""}) == [107]
    assert listed({"%TITLE": "BACK"}) == [102]
    assert listed({"TITLE": "Call %"}) == [101, 102, 103, 107]
    assert listed({">ID": 104, "RESPONSIBLE_ID": 3}) == [106]
    form = result(emu, "tasks.task.list", {"filter[GROUP_ID]": "1", "filter[!REAL_STATUS][]": ["5", "6"],
                                           "select[]": ["ID"], "order[DEADLINE]": "desc"}, form=True)
    assert ids(form["tasks"]) == [103, 102, 101, 107]  # NULL deadline last when descending

    for params, code in [
        ({"filter": {"<=DEADLINE": "2026-03-10T23:59:59"}}, "0"),  # strict: a filter date needs an offset
        ({"filter": {"<=DEADLINE": "10.03.2026 23:59:59"}}, "0"),
        ({"filter": {"groupId": 1}}, "0"),  # camelCase keys are for answers only
        ({"filter": {"NO_SUCH": 1}}, "0"),
        ({"FILTER": {"GROUP_ID": 1}}, "100"),
        ({"select": ["responsibleId"]}, "100"),
    ]:
        r = call(emu, "tasks.task.list", params)
        assert (r.status_code, r.json()["error"]) == (400, code), params
    bad = call(emu, "tasks.task.list", {"order": {"deadline": "asc"}})
    assert (bad.status_code, bad.json()) == (400, {"error": "0", "error_description": "Invalid sorting key"})


def test_task_list_pagination(emu: Bitrix24Emulator) -> None:
    emu.add_group("CallCenter", [2])
    for i in range(120):
        emu.add_task(f"Call {i}", 2, group_id=1)
    seen: list[int] = []
    start: Any = 0
    nexts = []
    while start is not None:
        body = call(emu, "tasks.task.list", {"filter": {"GROUP_ID": 1}, "select": ["ID"], "order": {"ID": "asc"},
                                             "start": start}).json()
        assert body["total"] == 120
        seen += ids(body["result"]["tasks"])
        start = body.get("next")
        nexts.append(start)
    assert seen == list(range(1, 121)) and nexts == [50, 100, None]
    newest = call(emu, "tasks.task.list", {"select": ["ID"]}).json()  # default order: ID desc
    assert ids(newest["result"]["tasks"])[:2] == [120, 119] and newest["next"] == 50
    fast = call(emu, "tasks.task.list", {"filter": {">ID": 100}, "order": {"ID": "asc"}, "start": -1}).json()
    assert ids(fast["result"]["tasks"]) == list(range(101, 121)) and fast["total"] == 0 and "next" not in fast


def test_task_get_update_complete(emu: Bitrix24Emulator) -> None:
    seed(emu)
    got = result(emu, "tasks.task.get", {"taskId": 101, "select": ["ID", "UF_CRM_TASK"]})
    assert got == {"task": {"id": "101", "ufCrmTask": ["C_12"]}}
    full = result(emu, "tasks.task.get", {"taskId": "101"})["task"]
    assert full["responsibleId"] == "2" and "ufCrmTask" not in full
    emu.delete_task(101)
    gone = call(emu, "tasks.task.get", {"taskId": 101})
    assert gone.status_code == 200 and gone.json()["result"] == []
    assert 101 not in emu.tasks and 101 not in ids(result(emu, "tasks.task.list", {})["tasks"])
    assert err(call(emu, "tasks.task.get", {}))[:2] == (400, "100")
    assert err(call(emu, "tasks.task.update", {"taskId": 101, "fields": {"TITLE": "x"}})) == (
        400, "0", "Action on the task is not allowed")
    with pytest.raises(KeyError):
        emu.delete_task(101)

    moved = result(emu, "tasks.task.update", {"taskId": 102, "fields": {"DEADLINE": "2026-03-12T18:00:00"}})
    assert moved["task"]["deadline"] == "2026-03-12T18:00:00+03:00"  # no offset: portal time
    result(emu, "tasks.task.update", {"taskId": 102, "fields": {"DEADLINE": "2026-03-12T18:00:00+05:00"}})
    assert emu.tasks[102]["DEADLINE"] == "2026-03-12T16:00:00+03:00"

    later = NOW + 3600
    emu.clock = lambda: later
    task = result(emu, "tasks.task.update", {"taskId": 102, "fields": {"RESPONSIBLE_ID": 4}})["task"]
    assert task["responsibleId"] == "4" and task["changedDate"] == "2026-03-10T13:00:00+03:00"
    assert emu.tasks[102]["CHANGED_DATE"] == "2026-03-10T13:00:00+03:00" and emu.tasks[102]["CHANGED_BY"] == "1"
    for who in (5, 999):
        assert err(call(emu, "tasks.task.update", {"taskId": 102, "fields": {"RESPONSIBLE_ID": who}})) == (
            400, "ERROR_CORE", "The user specified in the Responsible field was not found")
    assert emu.tasks[102]["RESPONSIBLE_ID"] == "4"
    assert err(call(emu, "tasks.task.update", {"taskId": 102, "fields": {"responsibleId": 3}}))[:2] == (400, "0")
    assert err(call(emu, "tasks.task.update", {"taskId": 102, "fields": {}}))[:2] == (400, "100")
    assert err(call(emu, "tasks.task.update", {"taskId": 102, "fields": {"DEADLINE": "tomorrow"}}))[:2] == (
        400, "ERROR_CORE")
    form = result(emu, "tasks.task.update", {"taskId": "102", "fields[DEADLINE]": "2026-03-13T09:00:00+03:00",
                                             "fields[UF_CRM_TASK][]": ["C_12", "CO_12"]}, form=True)
    assert form["task"]["deadline"] == "2026-03-13T09:00:00+03:00"
    assert emu.tasks[102]["UF_CRM_TASK"] == ["C_12", "CO_12"]

    done = result(emu, "tasks.task.complete", {"taskId": 102})["task"]
    assert done["status"] == "5" and done["closedDate"] == "2026-03-10T13:00:00+03:00"
    assert err(call(emu, "tasks.task.complete", {"taskId": 102}))[:2] == (400, "0")


def test_comments_positional_and_named(emu: Bitrix24Emulator) -> None:
    seed(emu)
    url = emu.webhook_url + "task.commentitem.add"
    r = requests.post(url, json=[102, {"POST_MESSAGE": "No answer, moved", "AUTHOR_ID": 2}], timeout=30)
    assert r.status_code == 200 and r.json()["result"] == 1
    assert result(emu, "task.commentitem.add", {"0": "102", "1[POST_MESSAGE]": "Busy"}, form=True) == 2
    assert result(emu, "task.commentitem.add", {"TASKID": 102, "FIELDS": {"POST_MESSAGE": "Talked"}}) == 3
    assert [(c["ID"], c["AUTHOR_ID"], c["POST_MESSAGE"]) for c in emu.comments[102]] == [
        (1, 2, "No answer, moved"), (2, 1, "Busy"), (3, 1, "Talked")]
    assert emu.comments[102][0]["POST_DATE"] == "2026-03-10T12:00:00+03:00"

    wrong_order = call(emu, "task.commentitem.add", {"FIELDS": {"POST_MESSAGE": "x"}, "TASKID": 102})
    assert err(wrong_order)[:2] == (400, "ERROR_CORE")
    assert err(requests.post(url, json=[999, {"POST_MESSAGE": "x"}], timeout=30)) == (
        400, "0", "Action on the task is not allowed")
    assert err(requests.post(url, json=[102, {"POST_MESSAGE": "  "}], timeout=30))[:2] == (400, "ERROR_CORE")
    assert err(requests.post(url, json=[102, {"POST_MESSAGE": "x", "AUTHOR_ID": 5}], timeout=30))[:2] == (
        400, "ERROR_CORE")
    assert len(emu.comments[102]) == 3
    # a JSON array body is only for the positional legacy methods
    assert err(requests.post(emu.webhook_url + "tasks.task.get", json=[102], timeout=30))[:2] == (
        400, "INVALID_REQUEST")


def test_im_notify(emu: Bitrix24Emulator) -> None:
    first = result(emu, "im.notify", {"USER_ID": 2, "MESSAGE": "Call task #102", "TAG": "dialer|102",
                                      "CLIENT_ID": "dialer"})
    other = result(emu, "im.notify", {"USER_ID": 3, "MESSAGE": "Call task #103", "TAG": "dialer|103",
                                      "CLIENT_ID": "dialer", "SUB_TAG": "x"})
    again = result(emu, "im.notify", {"USER_ID": 2, "MESSAGE": "  Call task #102 now  ", "TAG": "dialer|102",
                                      "CLIENT_ID": "dialer", "ATTACH": '[{"MESSAGE": "client: Ivan"}]'})
    assert isinstance(first, int) and first < other < again
    live = emu.notifications
    assert [n["ID"] for n in live] == [other, again]  # the same TAG replaced the first one
    assert live[1]["MESSAGE"] == "Call task #102 now" and live[1]["TYPE"] == "USER" and live[1]["AUTHOR_ID"] == 1
    assert live[1]["ATTACH"] == [{"MESSAGE": "client: Ivan"}] and live[0]["SUB_TAG"] == "x"

    assert err(call(emu, "im.notify", {"USER_ID": 2, "MESSAGE": "x", "TAG": "t"}))[:2] == (400, "CLIENT_ID_EMPTY")
    assert err(call(emu, "im.notify", {"USER_ID": 2, "MESSAGE": "x", "SUB_TAG": "s"}))[:2] == (400, "CLIENT_ID_EMPTY")
    plain = result(emu, "im.notify.personal.add", {"USER_ID": 2, "MESSAGE": "no tag, no client id"})
    system = result(emu, "im.notify", {"USER_ID": 2, "MESSAGE": "sys", "TYPE": "SYSTEM"}, form=True)
    pair = emu.issue_tokens()  # an application names itself: TAG needs no CLIENT_ID
    app = requests.post(emu.client_endpoint + "im.notify.system.add",
                        json={"auth": pair["access_token"], "USER_ID": 4, "MESSAGE": "m", "TAG": "t"}, timeout=30)
    assert app.status_code == 200, app.text
    by_id = {n["ID"]: n for n in emu.notifications}
    assert by_id[plain]["METHOD"] == "im.notify.personal.add" and by_id[system]["TYPE"] == "SYSTEM"
    assert by_id[app.json()["result"]]["AUTHOR_ID"] == 0 and by_id[app.json()["result"]]["CLIENT_ID"] == emu.client_id
    for params, code in [({"MESSAGE": "x"}, "USER_ID_EMPTY"), ({"USER_ID": 5, "MESSAGE": "x"}, "USER_NOT_FOUND"),
                         ({"USER_ID": 2, "MESSAGE": "   "}, "MESSAGE_EMPTY"),
                         ({"USER_ID": 2, "MESSAGE": "x", "ATTACH": "{not json"}, "ATTACH_ERROR"),
                         ({"USER_ID": 2, "MESSAGE": "x", "ATTACH": [{"MESSAGE": "y" * 60001}]}, "ATTACH_OVERSIZE")]:
        assert err(call(emu, "im.notify.system.add", params))[:2] == (400, code), params


def test_external_lines(emu: Bitrix24Emulator) -> None:
    add = "telephony.externalLine.add"
    assert result(emu, add, {"NUMBER": "autodial", "NAME": "Autodialer: tasks"}) == {"ID": 1}
    for params, text in [({"NUMBER": "autodial"}, "Line already exists"), ({"NAME": "x"}, "NUMBER should not be empty"),
                         ({"NUMBER": "x" * 51}, "DB error"),
                         ({"NUMBER": "l2", "CRM_AUTO_CREATE": "yes"}, "CRM_AUTO_CREATE should be Y or N")]:
        assert err(call(emu, add, params)) == (400, "ERROR_CORE", text)
    assert result(emu, add, {"NUMBER": "x" * 50, "CRM_AUTO_CREATE": "N"}) == {"ID": 2}
    assert result(emu, "telephony.externalLine.get")[0] == {"NUMBER": "autodial", "NAME": "Autodialer: tasks",
                                                            "CRM_AUTO_CREATE": "Y"}
    upd = "telephony.externalline.update"
    assert result(emu, upd, {"NUMBER": "autodial", "NAME": "Autodialer", "CRM_AUTO_CREATE": "N"}) == {"ID": "1"}
    assert emu.lines["autodial"] == {"NUMBER": "autodial", "NAME": "Autodialer", "CRM_AUTO_CREATE": "N"}
    assert err(call(emu, upd, {"NUMBER": "autodial"}))[2] == "There are no fields to update"
    assert err(call(emu, upd, {"NUMBER": "nope", "NAME": "x"}))[2] == "Could not find line with number nope"

    reg = result(emu, "telephony.externalcall.register", {"USER_ID": 2, "PHONE_NUMBER": "+79161234567", "TYPE": 1,
                                                          "LINE_NUMBER": "line-9", "SHOW": 0})
    assert reg["CALL_ID"] and emu.lines["line-9"] == {"NUMBER": "line-9", "NAME": "", "CRM_AUTO_CREATE": "Y"}
    assert [l["NUMBER"] for l in result(emu, "telephony.externalLine.get")] == ["autodial", "x" * 50, "line-9"]
    assert result(emu, "telephony.externalLine.delete", {"NUMBER": "autodial"}) == []
    assert "autodial" not in emu.lines
    assert err(call(emu, "telephony.externalLine.delete", {"NUMBER": "autodial"}))[0] == 400


def test_timeman_status_and_presence(emu: Bitrix24Emulator) -> None:
    own = result(emu, "timeman.status")  # default: the webhook's user
    assert (own["STATUS"], own["TIME_START"], own["TIME_FINISH"]) == ("OPENED", "2026-03-10T12:00:00+03:00", None)
    assert result(emu, "timeman.status", {"USER_ID": 3})["STATUS"] == "PAUSED"
    later = NOW + 8 * 3600
    emu.clock = lambda: later
    emu.set_user(2, timeman_status="CLOSED")
    closed = result(emu, "timeman.status", {"USER_ID": 2}, form=True)
    assert (closed["STATUS"], closed["TIME_FINISH"], closed["DURATION"]) == (
        "CLOSED", "2026-03-10T20:00:00+03:00", "08:00:00")
    emu.set_user(4, timeman_status="EXPIRED")
    assert result(emu, "timeman.status", {"USER_ID": 4})["TIME_START"] == "2026-03-09T20:00:00+03:00"
    assert err(call(emu, "timeman.status", {"USER_ID": 999})) == (400, "", "User not found")
    with pytest.raises(ValueError):
        emu.set_user(2, timeman_status="AWAY")

    seen = datetime(2026, 3, 10, 11, 45)
    emu.set_user(3, online=False, last_activity=seen)
    emu.set_user(4, online=True, inner="104")
    emu.set_user(2, active=False)
    rows = {u["ID"]: u for u in result(emu, "user.get", {"FILTER": {"@ID": [2, 3, 4]}})}
    assert (rows["3"]["IS_ONLINE"], rows["3"]["LAST_ACTIVITY_DATE"]) == ("N", "10.03.2026 11:45:00")
    assert rows["4"]["IS_ONLINE"] == "Y" and rows["4"]["UF_PHONE_INNER"] == "104" and rows["2"]["ACTIVE"] is False
    online = result(emu, "user.get", {"FILTER": {"IS_ONLINE": "Y", "ACTIVE": True}})
    assert [u["ID"] for u in online] == ["1", "4"]


def test_batch_dialer_round(emu: Bitrix24Emulator) -> None:
    seed(emu)
    due = urllib.parse.urlencode([("filter[GROUP_ID]", "$result[g][0][ID]"), ("filter[!REAL_STATUS][]", "5"),
                                  ("filter[!REAL_STATUS][]", "6"), ("filter[<=DEADLINE]", "2026-03-10T23:59:59+03:00"),
                                  ("select[]", "ID"), ("select[]", "RESPONSIBLE_ID"), ("select[]", "UF_CRM_TASK"),
                                  ("order[DEADLINE]", "asc")], safe="$[]")
    cmd = {
        "g": "sonet_group.get?FILTER[NAME]=CallCenter",
        "m": "sonet_group.user.get?ID=$result[g][0][ID]",
        "t": f"tasks.task.list?{due}",
        "task": "tasks.task.get?taskId=$result[t][tasks][0][id]&select[]=UF_CRM_TASK",
        "c": "crm.contact.get?id=12",
        "co": "crm.company.get?id=12",
        "u": "user.get?FILTER[@ID][]=2&FILTER[@ID][]=3",
        "u1": "user.get?FILTER[@ID][0]=4",
        "tm": "timeman.status?USER_ID=$result[t][tasks][1][responsibleId]",
        "cm": "task.commentitem.add?0=$result[t][tasks][0][id]&1[POST_MESSAGE]=No%20answer",
        "up": "tasks.task.update?taskId=$result[t][tasks][0][id]&fields[DEADLINE]=2026-03-10T15%3A00%3A00%2B03%3A00",
        "n": "im.notify?USER_ID=2&MESSAGE=Next%20call&TAG=dialer%7C101&CLIENT_ID=dialer",
        "l": "telephony.externalLine.add?NUMBER=autodial&NAME=Autodialer",
    }
    emu.set_bucket(1, drain_per_second=0.0)
    body = call(emu, "batch", {"halt": 1, "cmd": cmd}).json()["result"]
    assert call(emu, "scope").status_code == 503  # the batch took the single slot: one request
    emu.set_bucket(None)
    res = body["result"]
    assert body["result_error"] == []
    assert body["result_total"] == {"g": 1, "t": 2, "u": 2, "u1": 1}
    assert [r["USER_ID"] for r in res["m"]] == ["1", "2", "3", "4"]
    assert ids(res["t"]["tasks"]) == [101, 102] and res["t"]["tasks"][0]["ufCrmTask"] == ["C_12"]
    assert res["task"] == {"task": {"id": "101", "ufCrmTask": ["C_12"]}}
    assert res["c"]["UF_CRM_DNC"] == "1" and res["co"]["TITLE"] == "Acme"
    assert [u["ID"] for u in res["u"]] == ["2", "3"] and [u["ID"] for u in res["u1"]] == ["4"]
    assert res["tm"]["STATUS"] == "PAUSED"  # task 102 belongs to Boris
    assert emu.comments[101][0]["POST_MESSAGE"] == "No answer" and res["cm"] == emu.comments[101][0]["ID"]
    assert res["up"]["task"]["deadline"] == "2026-03-10T15:00:00+03:00"
    assert emu.notifications[0]["TAG"] == "dialer|101" and res["l"] == {"ID": 1}
    assert [r["batch"] for r in emu.requests_for("tasks.task.update")] == [True]
    assert emu.requests_for("task.commentitem.add")[0]["params"] == {"0": "101", "1": {"POST_MESSAGE": "No answer"}}


def test_scopes_and_auth_type() -> None:
    with Bitrix24Emulator(scopes=("basic", "user")) as e:
        e.add_user("Admin", user_id=1)
        for method in ("tasks.task.list", "tasks.task.get", "task.commentitem.add", "im.notify",
                       "im.notify.system.add", "sonet_group.get", "sonet_group.user.get", "timeman.status",
                       "telephony.externalLine.get"):
            r = requests.post(e.webhook_url + method, json={}, timeout=30)
            assert (r.status_code, r.json()["error"]) == (403, "insufficient_scope"), method
        inner = requests.post(e.webhook_url + "batch", json={"cmd": {"t": "tasks.task.list"}}, timeout=30)
        assert inner.json()["result"]["result_error"]["t"]["error"] == "insufficient_scope"
    with Bitrix24Emulator(allow_webhook_telephony=False) as e:
        r = requests.post(e.webhook_url + "telephony.externalLine.add", json={"NUMBER": "a"}, timeout=30)
        assert (r.status_code, r.json()["error"]) == (403, "WRONG_AUTH_TYPE")
        app = requests.post(e.client_endpoint + "telephony.externalLine.add",
                            json={"auth": e.issue_tokens()["access_token"], "NUMBER": "a"}, timeout=30)
        assert app.status_code == 200 and e.lines == {"a": {"NUMBER": "a", "NAME": "", "CRM_AUTO_CREATE": "Y"}}
