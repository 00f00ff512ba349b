"""Right outcome for ring groups and queues, routing to the responsible manager, missed calls."""
from __future__ import annotations

import time

from conftest import only_call

GROUP = "PJSIP/101&PJSIP/102&PJSIP/103"


def shown_ids(emulator):
    return sorted(only_call(emulator)["shown"])


def test_ring_group_of_three_second_answers(pbx, emulator):
    people = emulator.people
    lid = "1795600000.1"
    run = pbx.run(["incoming", "89035550101", "74951234567"], linkedid=lid, variables={"BITRIX_RING": GROUP})
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    # The card is up for every phone that rings: register shows it to 101, one batch to the others.
    assert shown_ids(emulator) == sorted(people[i] for i in ("101", "102", "103"))
    assert len(emulator.requests_for("batch")) == 1
    run = pbx.run(["answer"], linkedid=lid, channel="PJSIP/102-0000000b")
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert shown_ids(emulator) == [people["102"]]  # hidden from the two who did not answer
    time.sleep(1.05)
    pbx.run(["hangup", "ANSWER", "7"], linkedid=lid, dead=True)
    call = only_call(emulator)
    assert call["status_code"] == "200" and call["finish_user_id"] == people["102"]


def test_queue_unanswered_member_legs_do_not_overwrite_the_answered_outcome(pbx, emulator):
    people = emulator.people
    lid = "1795600100.1"
    pbx.run(["incoming", "89035550102"], linkedid=lid, variables={"BITRIX_RING": "PJSIP/101,PJSIP/103"})
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/103-00000011", context="bitrix-answer")
    # A member's leg that rang and never answered reports its own NOANSWER while the call goes on.
    run = pbx.run(["hangup", "NOANSWER", ""], linkedid=lid, dead=True, channel="PJSIP/101-00000010")
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert emulator.requests_for("telephony.externalcall.finish") == []
    time.sleep(1.05)
    # The caller's hangup after Queue(): no DIALSTATUS, but the answer was seen.
    pbx.run(["hangup", "", ""], linkedid=lid, dead=True, channel="PJSIP/provider-0000000f")
    call = only_call(emulator)
    assert call["status_code"] == "200" and call["finish_user_id"] == people["103"] and call["duration"] >= 1


def test_missed_call_goes_to_missed_calls_user_and_all_cards_close(pbx, emulator):
    people = emulator.people
    pbx.set("calls", "missed_calls_user", "103")
    lid = "1795600200.1"
    pbx.run(["incoming", "89035550103"], linkedid=lid, variables={"BITRIX_RING": "PJSIP/101&PJSIP/102"})
    assert shown_ids(emulator) == sorted([people["101"], people["102"]])
    pbx.run(["hangup", "NOANSWER", ""], linkedid=lid, dead=True)
    call = only_call(emulator)
    assert call["status_code"] == "304" and call["finish_user_id"] == people["103"]
    assert call["shown"] == []  # nobody is left with a card of a call that is over


def test_incoming_routed_to_the_responsible_manager_with_cache(pbx, emulator):
    pbx.set("calls", "route_to_responsible", "yes")
    run = pbx.run(["incoming", "+79161234567"], linkedid="1795600300.1", variables={"BITRIX_RING": GROUP})
    assert run.set_variables["BITRIX_RESPONSIBLE"] == "102"
    call = only_call(emulator)
    assert call["register"]["USER_PHONE_INNER"] == "102" and call["shown"] == [emulator.people["102"]]
    searches = len(emulator.requests_for("telephony.externalcall.searchcrmentities"))
    run = pbx.run(["incoming", "+79161234567"], linkedid="1795600300.2")
    assert run.set_variables["BITRIX_RESPONSIBLE"] == "102"
    assert len(emulator.requests_for("telephony.externalcall.searchcrmentities")) == searches  # cached
    assert pbx.log()[-1]["route"] == "cached"


def test_manager_with_closed_workday_is_not_routed_to(pbx, emulator):
    pbx.set("calls", "route_to_responsible", "yes")
    pbx.set("calls", "route_only_workday", "yes")
    emulator.set_user(emulator.people["102"], timeman_status="CLOSED")
    run = pbx.run(["incoming", "+79161234567"], linkedid="1795600400.1")
    assert run.set_variables["BITRIX_RESPONSIBLE"] == ""
    assert only_call(emulator)["register"]["USER_PHONE_INNER"] == "101"


def test_slow_lookup_falls_back_to_the_default_route_fast(pbx, emulator):
    pbx.set("calls", "route_to_responsible", "yes")
    pbx.set("calls", "route_timeout", "0.3")
    emulator.set_delay(3.0, method="telephony.externalcall.searchcrmentities", count=1)
    run = pbx.run(["incoming", "+79161234567"], linkedid="1795600500.1")
    assert run.set_variables["BITRIX_STATUS"] == "OK" and run.set_variables["BITRIX_RESPONSIBLE"] == ""
    assert run.duration < 2.0
    assert only_call(emulator)["register"]["USER_PHONE_INNER"] == "101"
    assert "routing_error" in pbx.log()[-1]
