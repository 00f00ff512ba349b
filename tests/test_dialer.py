"""The auto-dialer end to end: Bitrix24 emulator (tasks, group, users) + fake AMI + the dialplan's AGI
steps run by the fake Asterisk, all through `agi-bitrix dialer run --once` and the AGI entry point."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Dict, List, Optional
from zoneinfo import ZoneInfo

import pytest

from conftest import ENTRY
from agi_bitrix.testing.fake_ami import FakeAMI, OriginateOutcome, originate_variables

MSK = timezone(timedelta(hours=3))


def past(minutes: int = 10) -> str:
    return (datetime.now(MSK) - timedelta(minutes=minutes)).isoformat(timespec="seconds")


class CallCenter:
    """A call center's portal: group CallCenter, operators 101/102, tasks to call clients."""

    def __init__(self, pbx, emulator, ami: FakeAMI) -> None:
        self.pbx, self.emu, self.ami = pbx, emulator, ami
        self.anna, self.boris = emulator.people["101"], emulator.people["102"]
        self.group = emulator.add_group("CallCenter", [self.anna, self.boris], owner_id=self.anna)
        emulator.add_group("Sales", [emulator.people["103"]])
        pbx.values["asterisk"].update(ami_host="127.0.0.1", ami_port=str(ami.port), ami_user=ami.username,
                                      ami_secret=ami.secret)
        pbx.values["dialer"] = {"hours": "00:00-24:00", "hours_weekend": "00:00-24:00", "max_channels": "2",
                                "max_attempts": "3", "retry_busy": "1h", "retry_noanswer": "2h",
                                "retry_unreachable": "3h", "reassign_after": "30m", "ring_timeout": "20"}
        pbx.write()
        self.script: Dict[str, OriginateOutcome] = {}
        self.answered: List[threading.Thread] = []
        ami.on_originate(self._decide)

    def task(self, title: str, phones: List[str], responsible: Optional[int] = None, **contact) -> int:
        contact_row = self.emu.add_contact(title.split(":")[-1].strip(), phones, assigned_by_id=self.anna, **contact)
        task = self.emu.add_task(title, responsible or self.anna, group_id=int(self.group["ID"]), deadline=past(),
                                 crm=[f"C_{contact_row['ID']}"])
        return int(task["ID"])

    # -- the PBX side --------------------------------------------------------------------------
    def _decide(self, action) -> OriginateOutcome:
        channel = action.get("Channel") or ""
        for needle, outcome in self.script.items():
            if needle in channel:
                return outcome
        return OriginateOutcome(reason=4, on_answer=lambda: self.dialplan(action))

    def dialplan(self, action, operator_answers: bool = True, talk: int = 2) -> None:
        """What [bitrix-dialer] does once the first party answered."""
        lid = action.get("ChannelId")
        exten = action.get("Exten")
        variables = dict(originate_variables(action))
        run = self.pbx.run(["dialer-answered"], linkedid=lid, uniqueid=lid, context="bitrix-dialer",
                           extension=exten, variables=variables, channel=action.get("Channel") + "-0001")
        self.last_answered = run
        if not run.set_variables.get("DIALER_DIAL"):
            return
        if operator_answers:
            self.pbx.run(["dialer-connected"], linkedid=lid, channel="PJSIP/101-0002",
                         context="bitrix-dialer-connected")
            self.pbx.advance(talk + 0.5)   # the talk, on a clock the test moves
            self.pbx.run(["hangup", "ANSWER", str(talk)], linkedid=lid, dead=True, variables=variables)
        else:
            self.pbx.run(["hangup", "NOANSWER", ""], linkedid=lid, dead=True, variables=variables)

    def run(self, *extra: str):
        res = self.pbx.cli("dialer", "run", "--once", *extra)
        self.wait_calls()
        return res

    def wait_calls(self, timeout: float = 120) -> None:
        end = time.time() + timeout
        while time.time() < end and self.ami.channels:
            time.sleep(0.05)


@pytest.fixture
def center(service_pbx, emulator):
    """The dialer runs as a command; the dialplan's steps are served by the service in this process
    (the first test runs them as processes too)."""
    with FakeAMI(username="crm", secret="ami-secret-1") as ami:
        yield CallCenter(service_pbx, emulator, ami)


@pytest.fixture
def any_center(any_pbx, emulator):
    with FakeAMI(username="crm", secret="ami-secret-1") as ami:
        yield CallCenter(any_pbx, emulator, ami)


def comments(emulator, task_id) -> List[str]:
    return [c["POST_MESSAGE"] for c in emulator.comments.get(task_id, [])]


def test_client_answers_and_is_connected_to_the_responsible_operator(any_center, emulator):
    center = any_center
    task = center.task("Позвонить: Иван Петров", ["+7 916 111-22-33"], responsible=center.boris)
    res = center.run()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "dialed 1" in res.stdout
    originate = center.ami.originates[0]
    assert originate.get("Channel") == "PJSIP/+79161112233@provider"
    assert originate.get("Context") == "bitrix-dialer" and originate.get("Exten") == "client"
    lid = originate.get("ChannelId")
    # The dialplan learned whom to ring and how to mark the call for the operator.
    sets = center.last_answered.set_variables
    assert sets["DIALER_DIAL"] == "PJSIP/102" and sets["DIALER_CALLERID_NAME"] == "АВТО:Иван Петров"
    calls = [c for c in emulator.calls.values() if c["register"]["EXTERNAL_CALL_ID"] == lid]
    assert len(calls) == 1
    call = calls[0]
    assert call["user_id"] == center.boris and call["register"]["LINE_NUMBER"] == "autodialer"
    assert call["crm_entity_type"] == "CONTACT" and int(call["register"]["SHOW"]) == 1  # "1" inside a batch
    assert call["finished"] and call["status_code"] == "200" and call["duration"] == 2
    assert "autodialer" in emulator.lines and emulator.lines["autodialer"]["NAME"] == "Автообзвон"
    note = [n for n in emulator.notifications if n["USER_ID"] in (center.boris, str(center.boris))]
    assert note and "Позвонить: Иван Петров" in note[0]["MESSAGE"] and f"/task/view/{task}/" in note[0]["MESSAGE"]
    assert any("разговор с клиентом" in c for c in comments(emulator, task))
    # The task is the operator's now: the next pass does not dial it again.
    center.run()
    assert len(center.ami.originates) == 1


@pytest.mark.parametrize("reason,outcome,code,retry_h", [(5, "занят", "486", 1), (3, "не ответил", "304", 2),
                                                         (0, "недоступен", "480", 3)])
def test_failed_attempt_is_logged_rescheduled_and_counted(center, emulator, reason, outcome, code, retry_h):
    task = center.task("Позвонить: Ольга", ["89162223344"])
    center.script["+79162223344"] = OriginateOutcome(reason=reason)
    before = time.time()
    center.run()
    call = next(iter(emulator.calls.values()))
    assert call["status_code"] == code and call["finished"] and int(call["register"]["SHOW"]) == 0
    new_deadline = datetime.fromisoformat(emulator.tasks[task]["DEADLINE"]).timestamp()
    assert abs(new_deadline - (before + retry_h * 3600)) < 120
    text = comments(emulator, task)[-1]
    assert outcome in text and "Попытка 1 из 3" in text
    # The next try in the operators' zone, named (default: [dialer] default_timezone), not the PBX's.
    when = datetime.fromtimestamp(new_deadline, ZoneInfo("Europe/Moscow")).strftime("%d.%m.%Y %H:%M")
    assert f"Следующая попытка: {when} (Europe/Moscow)" in text
    status = center.pbx.cli("dialer", "status").stdout
    assert str(task) in status and " 1 " in status


def test_congestion_is_not_the_clients_attempt(center, emulator):
    task = center.task("Позвонить: Пётр", ["89163334455"])
    center.script["+79163334455"] = OriginateOutcome(reason=8)
    center.run()
    assert emulator.calls == {}  # not a call with the client
    assert comments(emulator, task) == []
    assert "tasks.task.update" not in [r["method"] for r in emulator.requests]
    from agi_bitrix.dialer.state import DialerState
    from agi_bitrix.store import Store

    store = Store(str(center.pbx.state_dir))
    state = DialerState(store).task(task)
    assert state.attempts == 0 and state.last_outcome == "congestion"


def test_no_operator_online_nothing_is_dialed(center, emulator):
    center.task("Позвонить: кто-то", ["89164445566"])
    emulator.set_user(center.anna, online=False)
    emulator.set_user(center.boris, online=False)
    res = center.run()
    assert res.returncode == 0 and "no operator online" in res.stdout
    assert center.ami.originates == []


def test_operator_phone_busy_in_asterisk_is_not_free(center, emulator):
    center.task("Позвонить: кто-то", ["89164445566"], responsible=center.boris)
    center.ami.set_extension_state("101", 1)
    center.ami.set_extension_state("102", 2)
    res = center.run()
    assert "no operator online and free" in res.stdout and center.ami.originates == []


def test_responsible_offline_too_long_task_is_reassigned(center, emulator):
    task = center.task("Позвонить: Нина", ["89165556677"], responsible=center.boris)
    emulator.set_user(center.boris, online=False)
    center.pbx.set("dialer", "reassign_after", "1s")
    center.run()  # first seen away
    assert center.ami.originates == []
    time.sleep(1.1)
    center.run()
    assert emulator.tasks[task]["RESPONSIBLE_ID"] in (center.anna, str(center.anna))
    assert any("передана оператору" in c for c in comments(emulator, task))
    assert len(center.ami.originates) == 1


def test_responsible_outside_the_group_is_replaced(center, emulator):
    task = center.task("Позвонить: Захар", ["89166667788"], responsible=emulator.people["103"])
    center.run()
    assert emulator.tasks[task]["RESPONSIBLE_ID"] in (center.anna, str(center.anna))
    assert any("не состоит в группе" in c for c in comments(emulator, task))


def test_max_attempts_then_a_final_comment_and_no_more_dialing(center, emulator):
    task = center.task("Позвонить: Глеб", ["89167778899"])
    center.script["+79167778899"] = OriginateOutcome(reason=5)
    for _ in range(3):
        center.pbx.set("dialer", "retry_busy", "0s")
        center.run()
    assert len(center.ami.originates) == 3
    assert "попытки исчерпаны" in comments(emulator, task)[-1]
    center.run()
    assert len(center.ami.originates) == 3


def test_outside_calling_hours_in_the_clients_time_zone(center, emulator):
    center.task("Позвонить: Новосибирск", ["+7 383 212-34-56"])
    now_nsk = datetime.now(timezone(timedelta(hours=7)))
    closed = (now_nsk + timedelta(hours=2)).strftime("%H:00")
    if closed <= now_nsk.strftime("%H:%M") or closed == "00:00":
        pytest.skip("window arithmetic crosses midnight in Novosibirsk right now")
    center.pbx.set("dialer", "hours", f"{closed}-23:59")
    center.pbx.set("dialer", "hours_weekend", f"{closed}-23:59")
    res = center.run()
    assert center.ami.originates == [] and "outside calling hours" in res.stdout


def test_do_not_call_list_and_crm_field(center, emulator, tmp_path):
    dnc = tmp_path / "dnc.txt"
    dnc.write_text("# never call\n8 (916) 888-99-00\n")
    t1 = center.task("Позвонить: в списке", ["+79168889900"])
    t2 = center.task("Позвонить: флаг в CRM", ["+79169990011"], fields={"UF_CRM_DNC": "Y"})
    center.pbx.set("dialer", "dnc_file", str(dnc))
    center.pbx.set("dialer", "dnc_field", "UF_CRM_DNC")
    center.run()
    assert center.ami.originates == []
    assert "не звонить" in comments(emulator, t1)[-1] and "не звонить" in comments(emulator, t2)[-1]


def test_two_dialers_started_at_once_dial_a_task_once(center, emulator):
    center.task("Позвонить: один раз", ["89161010101"])
    env = dict(os.environ, AGI_BITRIX_SETTINGS=str(center.pbx.settings_file))
    env.pop("AST_AGI_DIR", None)
    procs = [subprocess.Popen([str(ENTRY), "dialer", "run", "--once"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    center.wait_calls()
    assert len(center.ami.originates) == 1
    assert sum("another dialer is running" in err for _, err in outs) <= 1


def test_hostile_numbers_from_crm_never_reach_a_dial_string(center, emulator):
    task = center.task("Позвонить: хакер", ["100&PJSIP/evil", "8916,1234567", "letters", "", "+1 (555) 0100"])
    center.run()
    assert center.ami.originates == []
    text = comments(emulator, task)[-1]
    assert "нет номера телефона" in text and "Отклонены номера" in text
    center.task("Позвонить: смешанные номера", ["abc", "+7 916 121-21-21 доб. 5", "8 916 131-31-31"])
    center.run()
    channels = [o.get("Channel") for o in center.ami.originates]
    assert channels == ["PJSIP/+79161313131@provider"]


def test_task_without_phone_and_deleted_task_do_not_break_the_loop(center, emulator):
    t1 = center.task("Позвонить: без номера", [])
    t2 = center.task("Позвонить: удалённая", ["89161414141"])
    center.task("Позвонить: нормальная", ["89161515151"])
    emulator.delete_task(t2)
    res = center.run()
    assert res.returncode == 0
    assert "нет номера телефона" in comments(emulator, t1)[-1]
    assert [o.get("Channel") for o in center.ami.originates] == ["PJSIP/+79161515151@provider"]


def test_operator_first_rings_the_operator_with_the_dialer_mark(center, emulator):
    center.pbx.set("dialer", "mode", "operator_first")
    center.task("Позвонить: Клиент Первый", ["89161616161"], responsible=center.boris)
    center.run()
    originate = center.ami.originates[0]
    assert originate.get("Channel") == "PJSIP/102" and originate.get("Exten") == "operator"
    assert originate.get("CallerID") == '"АВТО:Клиент Первый" <+79161616161>'
    assert center.last_answered.set_variables["DIALER_DIAL"] == "PJSIP/+79161616161@provider"
    call = next(iter(emulator.calls.values()))
    assert call["finished"] and call["status_code"] == "200"


def test_failed_extension_step_records_the_outcome_once(center, emulator):
    """If the dialer died before the OriginateResponse, the dialplan's `failed` step records it."""
    task = center.task("Позвонить: через failed", ["89161717171"])
    center.script["+79161717171"] = OriginateOutcome(reason=5)
    center.run()
    attempt = center.ami.originates[0].get("ChannelId")
    run = center.pbx.run(["dialer-failed", "5"], linkedid="1795999999.9", channel="OutgoingSpoolFailed",
                         variables={"DIALER_ATTEMPT": attempt, "DIALER_TASK": str(task)})
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert "already recorded" in center.pbx.log()[-1].get("note", "")
    assert len([c for c in comments(emulator, task) if "занят" in c]) == 1


def test_operator_without_inner_number_and_english_texts(center, emulator):
    emulator.set_user(center.boris, inner="")
    center.pbx.set("dialer", "language", "en")
    center.pbx.set("dialer", "reassign_after", "0s")
    task = center.task("Call: John", ["89161818181"], responsible=center.boris)
    center.run()
    texts = comments(emulator, task)
    assert any("has no inner number" in c for c in texts)
    assert any("goes to operator" in c for c in texts)
    assert [o.get("Channel") for o in center.ami.originates] == ["PJSIP/+79161818181@provider"]
    assert center.last_answered.set_variables["DIALER_DIAL"] == "PJSIP/101"
