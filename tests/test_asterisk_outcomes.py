"""Calls as a real Asterisk runs them: what Dial, Queue and transfers leave on the channel (taught
to the fake from Asterisk's sources), the `answer` step never waiting on the portal, no card left up."""
from __future__ import annotations

import time

import pytest
from conftest import only_call

from agi_bitrix.testing.fake_asterisk import after_blind_transfer, after_dial, after_queue, hangup_args

GROUP = "PJSIP/101&PJSIP/102&PJSIP/103"
CALLER = dict(channel="PJSIP/provider-00000001", callerid="89035550101")


@pytest.fixture
def pbx(service_pbx):
    """What a call's steps leave in Bitrix24 is the same in both transports: the steps are served by
    the service in this process (the first test runs them as processes too)."""
    return service_pbx


def shown(emulator):
    return sorted(only_call(emulator)["shown"])


def parts(emulator):
    return sorted(emulator.calls.values(), key=lambda c: c["registered_at"])


def test_answer_returns_before_a_stuck_portal_and_the_card_still_moves(any_pbx, emulator):
    pbx = any_pbx
    people = emulator.people
    pbx.set("bitrix24", "timeout", "30")  # a step that waited would outlive Asterisk's patience (the fake's 15 s)
    lid = "1795700000.1"
    pbx.run(["incoming", "", "74951234567"], linkedid=lid, variables={"BITRIX_RING": GROUP}, **CALLER)
    gate = emulator.hold("batch")
    run = pbx.run(["answer"], linkedid=lid, channel="PJSIP/102-00000002", wait_delivery=False)
    # Asterisk has the step back while the portal still sits on the card move.
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "QUEUED"
    assert shown(emulator) == sorted(people[i] for i in ("101", "102", "103"))
    gate.set()  # the portal answers: the step's child process (or the service) delivers the move
    pbx.wait_for(lambda: shown(emulator) == [people["102"]], "the card to move to 102")
    pbx.wait_for(lambda: any(e["event"] == "answer" for e in pbx.log()), "the answer step's log line")
    line = [e for e in pbx.log() if e["event"] == "answer"][-1]
    assert line["status"] == "OK" and line["linkedid"] == lid and "released_ms" in line


def test_queue_answered_follows_the_member_with_asterisks_count(pbx, emulator):
    lid = "1795700100.1"
    pbx.run(["incoming"], linkedid=lid, variables={"BITRIX_RING": "PJSIP/101&PJSIP/103"}, **CALLER)
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/103-00000011")
    pbx.advance(8.5)
    left = after_queue("answered", talked=8.2)
    run = pbx.run(hangup_args(left), linkedid=lid, dead=True, variables=left, **CALLER)
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    call = only_call(emulator)
    assert call["status_code"] == "200" and call["finish_user_id"] == emulator.people["103"]
    assert call["duration"] == 8 and call["shown"] == []


def test_caller_giving_up_in_a_queue_is_cancelled_not_missed(pbx, emulator):
    lid = "1795700200.1"
    pbx.run(["incoming"], linkedid=lid, variables={"BITRIX_RING": "PJSIP/101&PJSIP/103"}, **CALLER)
    left = after_queue("abandoned")
    assert hangup_args(left) == ["hangup", "", "0", ""]  # what Asterisk 22 passed: hangup,,0,
    run = pbx.run(hangup_args(left), linkedid=lid, dead=True, variables=left, **CALLER)
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    call = only_call(emulator)
    assert call["status_code"] == "603-S" and call["duration"] == 0 and call["shown"] == []


def test_queue_timeout_is_missed(pbx, emulator):
    lid = "1795700300.1"
    pbx.run(["incoming"], linkedid=lid, variables={"BITRIX_RING": "PJSIP/101&PJSIP/103"}, **CALLER)
    left = after_queue("TIMEOUT")
    pbx.run(hangup_args(left), linkedid=lid, dead=True, variables=left, **CALLER)
    call = only_call(emulator)
    assert call["status_code"] == "304" and call["shown"] == []
    assert pbx.log()[-1]["queuestatus"] == "TIMEOUT"


def test_queue_without_members_is_one_clear_line_and_a_missed_call(pbx, emulator):
    lid = "1795700400.1"
    pbx.run(["incoming"], linkedid=lid, variables={"BITRIX_RING": ""}, **CALLER)
    left = after_queue("JOINEMPTY")
    run = pbx.run(hangup_args(left), linkedid=lid, dead=True, variables=left, **CALLER)
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert only_call(emulator)["status_code"] == "304"
    assert "no member" in pbx.log()[-1]["queue_note"]
    assert len(emulator.requests_for("telephony.externalcall.finish")) == 1  # nothing else touched


def test_blind_transfer_to_a_colleague_gives_each_part_its_own_time(pbx, emulator):
    people = emulator.people
    lid = "1795700500.1"
    pbx.run(["incoming"], linkedid=lid, **CALLER)
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/101-00000002")
    pbx.advance(4.7)  # billsec 4, 4.7 s bridged: Asterisk's count for the first part is 4
    run = pbx.run(["transfer", "103"], linkedid=lid, context="bitrix-transfer",
                  variables=after_blind_transfer("PJSIP/101-00000002", talked=4.7), **CALLER)
    assert run.set_variables["BITRIX_DIAL"] == "PJSIP/103"
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/103-00000004")
    pbx.advance(9.6)
    left = after_dial(True, talked=9.3)  # the Dial of [bitrix-transfer]
    pbx.run(hangup_args(left), linkedid=lid, dead=True, variables=left, **CALLER)
    first, second = parts(emulator)
    assert (first["duration"], second["duration"]) == (4, 9)
    assert (first["finish_user_id"], second["finish_user_id"]) == (people["101"], people["103"])


def test_attended_transfer_to_a_colleague_gives_each_part_its_own_time(pbx, emulator):
    people = emulator.people
    lid = "1795700600.1"
    pbx.run(["incoming"], linkedid=lid, **CALLER)
    began = time.monotonic()  # the answer's time is taken inside its step: count from before it
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/102-00000002")
    pbx.advance(5.5)
    # 102 dials 103 (atxfer): a Local channel of the same call runs [bitrix-transfer]; no Dial ended on it.
    run = pbx.run(["transfer", "103"], linkedid=lid, channel="Local/103@bitrix-transfer-00000001;2",
                  context="bitrix-transfer")
    assert run.set_variables["BITRIX_DIAL"] == "PJSIP/103"
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/103-00000005")
    pbx.advance(20.5)
    # The caller never left the Dial that connected 102: its ANSWEREDTIME covers both parts (26).
    left = after_dial(True, talked=26.1)
    pbx.run(hangup_args(left), linkedid=lid, dead=True, variables=left, **CALLER)
    steps = time.monotonic() - began
    first, second = parts(emulator)
    assert (first["finish_user_id"], second["finish_user_id"]) == (people["102"], people["103"])
    assert 5 <= first["duration"] <= 5.5 + steps
    assert 20 <= second["duration"] <= 20.5 + steps  # this part's own span, not 26


def test_blind_transfer_to_an_external_number_goes_out_by_the_trunk(pbx, emulator):
    lid = "1795700700.1"
    pbx.run(["incoming"], linkedid=lid, **CALLER)
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/101-00000002")
    pbx.advance(3.2)
    run = pbx.run(["transfer", "84957654321"], linkedid=lid, context="bitrix-transfer",
                  variables=after_blind_transfer("PJSIP/101-00000002", talked=3.1), **CALLER)
    assert run.set_variables["BITRIX_DIAL"] == "PJSIP/+74957654321@provider"
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    left = after_dial(True, talked=30)  # the client talks to the outside number
    pbx.run(hangup_args(left), linkedid=lid, dead=True, variables=left, **CALLER)
    call = only_call(emulator)  # no part for the outside number
    assert call["duration"] == 3 and call["status_code"] == "200"
    assert len(emulator.requests_for("telephony.externalcall.finish")) == 1


def test_no_card_left_up_after_an_outage_whose_register_reached_the_portal(pbx, emulator):
    people = emulator.people
    pbx.set("bitrix24", "timeout", pbx.short_budget)
    gate = emulator.hold("telephony.externalcall.register")  # it reaches the portal, its answer does not
    lid = "1795700800.1"
    run = pbx.run(["incoming"], linkedid=lid, variables={"BITRIX_RING": "PJSIP/101&PJSIP/102"}, **CALLER)
    assert run.set_variables["BITRIX_STATUS"] == "QUEUED" and "TIMEOUT" in pbx.log()[-1]["reason"]
    gate.set()  # the portal now carries it out: the card is up for 101, and for 102 (the same request)
    pbx.wait_for(lambda: len(emulator.calls) == 1 and shown(emulator) == [people["101"], people["102"]],
                 "the late register")
    emulator.stop()  # the outage
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/102-00000002")
    pbx.run(["hangup", "ANSWER", "5"], linkedid=lid, dead=True, **CALLER)
    emulator.start()
    res = pbx.cli("outbox", "flush")
    assert res.returncode == 0, res.stderr
    call = only_call(emulator)
    assert call["finished"] and call["finish_user_id"] == people["102"]
    assert call["shown"] == []  # 101's card, shown by the first attempt, is hidden


def test_bad_transfer_targets_and_unknown_calls_touch_nothing(pbx, emulator):
    lid = "1795700900.1"
    pbx.run(["incoming"], linkedid=lid, **CALLER)
    before = len(emulator.requests_for("batch")) + len(emulator.requests_for("telephony.externalcall.finish"))
    for target in ("", "abc", "10a"):
        run = pbx.run(["transfer", target], linkedid=lid, context="bitrix-transfer", **CALLER)
        assert run.returncode == 0 and run.set_variables["BITRIX_DIAL"] == ""
        assert run.set_variables["BITRIX_STATUS"] == "ERROR"
        assert "not a number" in pbx.log()[-1]["reason"]
    # A transfer of a call never registered: dialed all the same, Bitrix24 not told.
    run = pbx.run(["transfer", "103"], linkedid="1795700900.9", context="bitrix-transfer", **CALLER)
    assert run.set_variables["BITRIX_DIAL"] == "PJSIP/103" and run.set_variables["BITRIX_STATUS"] == "ERROR"
    assert "no call is known" in pbx.log()[-1]["reason"]
    after = len(emulator.requests_for("batch")) + len(emulator.requests_for("telephony.externalcall.finish"))
    assert after == before and len(emulator.calls) == 1 and not only_call(emulator)["finished"]


def test_hangup_with_junk_answeredtime_and_of_a_call_never_registered(pbx, emulator):
    lid = "1795701000.1"
    pbx.run(["incoming"], linkedid=lid, **CALLER)
    began = time.monotonic()
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/101-00000002")
    pbx.advance(7.2)
    run = pbx.run(["hangup", "ANSWER", "7;DROP"], linkedid=lid, dead=True, **CALLER)
    steps = time.monotonic() - began
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert "ignored ANSWEREDTIME" in pbx.log()[-1]["answeredtime_note"]
    assert 7 <= only_call(emulator)["duration"] <= 7.2 + steps  # the span, floored
    # A refused *9 number: never dialed nor registered, and its hangup is a note, not an error.
    run = pbx.run(["dial", "12", "101"], linkedid="1795701000.7", channel="PJSIP/101-00000009")
    assert run.set_variables["BITRIX_STATUS"] == "ERROR" and run.executed_apps() == []
    run = pbx.run(["hangup", "", ""], linkedid="1795701000.7", dead=True, channel="PJSIP/101-00000009")
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    line = pbx.log()[-1]
    assert line["level"] == "info" and "nothing to finish" in line["note"]
    assert len(emulator.calls) == 1
