"""Right outcome for ring groups and queues, routing to the responsible manager, missed calls."""
from __future__ import annotations

import time

import pytest
from conftest import HELD, only_call

from agi_bitrix.testing.fake_asterisk import after_dial

GROUP = "PJSIP/101&PJSIP/102&PJSIP/103"


@pytest.fixture
def pbx(service_pbx):
    """What a call's steps leave in Bitrix24 is the same in both transports: the steps are served by
    the service in this process (the blind transfer's test runs them as processes too)."""
    return service_pbx


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
    assert run.set_variables["BITRIX_STATUS"] == "QUEUED"
    assert shown_ids(emulator) == [people["102"]]  # hidden from the two who did not answer
    pbx.advance(7.4)
    pbx.run(["hangup", "ANSWER", "7"], linkedid=lid, dead=True)
    call = only_call(emulator)
    assert call["status_code"] == "200" and call["finish_user_id"] == people["102"]
    assert call["duration"] == 7


def test_queue_unanswered_member_legs_do_not_overwrite_the_answered_outcome(pbx, emulator):
    people = emulator.people
    lid = "1795600100.1"
    pbx.run(["incoming", "89035550102"], linkedid=lid, variables={"BITRIX_RING": "PJSIP/101,PJSIP/103"})
    began = time.monotonic()
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/103-00000011", context="bitrix-answer")
    # A member's leg that rang and never answered reports its own NOANSWER while the call goes on.
    run = pbx.run(["hangup", "NOANSWER", ""], linkedid=lid, dead=True, channel="PJSIP/101-00000010")
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert emulator.requests_for("telephony.externalcall.finish") == []
    pbx.advance(12.5)
    # The caller's hangup after Queue(): no DIALSTATUS, but the answer was seen; a Queue() of an
    # Asterisk before the timing variables leaves no ANSWEREDTIME: the span counts, floored.
    pbx.run(["hangup", "", ""], linkedid=lid, dead=True, channel="PJSIP/provider-0000000f")
    steps = time.monotonic() - began  # real time the steps themselves took
    call = only_call(emulator)
    assert call["status_code"] == "200" and call["finish_user_id"] == people["103"]
    assert 12 <= call["duration"] <= 12.5 + steps  # floored, never rounded up


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
    emulator.hold("telephony.externalcall.searchcrmentities")  # stuck until the test ends
    run = pbx.run(["incoming", "+79161234567"], linkedid="1795600500.1")
    assert run.set_variables["BITRIX_STATUS"] == "OK" and run.set_variables["BITRIX_RESPONSIBLE"] == ""
    assert run.duration < HELD  # the lookup gave up after 0.3 s; the portal still holds it
    assert only_call(emulator)["register"]["USER_PHONE_INNER"] == "101"
    assert "routing_error" in pbx.log()[-1]


def _parts(emulator):
    return sorted(emulator.calls.values(), key=lambda c: c["registered_at"])


def test_blind_transfer_both_halves_in_crm(any_pbx, emulator):
    pbx = any_pbx
    people = emulator.people
    lid = "1795600600.1"
    pbx.run(["incoming", "+79161234567"], linkedid=lid)  # a known client (contact)
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/101-00000021")
    pbx.advance(4.7)
    # 101 presses the blind-transfer code: the caller goes to [bitrix-transfer] with EXTEN=103,
    # his Dial to 101 over, its ANSWEREDTIME (4) on his channel.
    run = pbx.run(["transfer", "103"], linkedid=lid, channel="PJSIP/provider-00000020", context="bitrix-transfer",
                  variables=after_dial(answered=True, talked=4.2))
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert run.set_variables["BITRIX_DIAL"] == "PJSIP/103"
    first, second = _parts(emulator)
    assert first["finished"] and first["status_code"] == "200" and first["finish_user_id"] == people["101"]
    assert first["duration"] == 4
    assert second["register"]["EXTERNAL_CALL_ID"] == f"{lid}-t2" and second["CALL_ID"] != first["CALL_ID"]
    assert second["user_id"] == people["103"] and not second["finished"]
    assert (second["crm_entity_type"], second["crm_entity_id"]) == (first["crm_entity_type"], first["crm_entity_id"])
    assert run.set_variables["BITRIX_CALL_ID"] == second["CALL_ID"]
    pbx.run(["answer"], linkedid=lid, channel="PJSIP/103-00000023")
    pbx.advance(9.5)
    # The hangup handler sees the Dial of [bitrix-transfer]: its ANSWEREDTIME is the second part's.
    pbx.run(["hangup", "ANSWER", "9"], linkedid=lid, dead=True, channel="PJSIP/provider-00000020")
    first, second = _parts(emulator)
    assert second["finished"] and second["status_code"] == "200" and second["finish_user_id"] == people["103"]
    assert first["duration"] == 4 and second["duration"] == 9
    assert len(emulator.requests_for("telephony.externalcall.finish")) == 2


def test_attended_transfer_to_nobody_answering(pbx, emulator):
    people = emulator.people
    lid = "1795600700.1"
    pbx.run(["incoming", "89035557777"], linkedid=lid)
    pbx.run(["answer", "102"], linkedid=lid)
    # 102 consults 103 (*2): the consultation leg runs `transfer 103` on a channel of the same call.
    pbx.run(["transfer", "103"], linkedid=lid, channel="PJSIP/102-00000031")
    pbx.run(["hangup", "NOANSWER", ""], linkedid=lid, dead=True)
    first, second = _parts(emulator)
    assert first["finish_user_id"] == people["102"] and first["status_code"] == "200"
    assert second["finish_user_id"] == people["103"] and second["status_code"] == "304"


def test_transfer_while_portal_down_replays_both_parts_in_order(pbx, emulator):
    lid = "1795600800.1"
    emulator.stop()
    pbx.run(["incoming", "+79161234567"], linkedid=lid)
    pbx.run(["answer", "101"], linkedid=lid)
    pbx.run(["transfer", "102"], linkedid=lid)
    pbx.run(["answer", "102"], linkedid=lid)
    pbx.run(["hangup", "ANSWER", "20"], linkedid=lid, dead=True)
    emulator.start()
    res = pbx.cli("outbox", "flush")
    assert res.returncode == 0 and "dead-lettered 0" in res.stdout, res.stdout
    first, second = _parts(emulator)
    assert first["finished"] and second["finished"]
    assert second["crm_entity_type"] == "CONTACT"


def test_transfer_refuses_a_hostile_target(pbx, emulator):
    pbx.run(["incoming", "89035558888"], linkedid="1795600900.1")
    run = pbx.run(["transfer", "103&PJSIP/evil"], linkedid="1795600900.1")
    assert run.set_variables["BITRIX_STATUS"] == "ERROR" and len(emulator.calls) == 1


def test_fired_manager_is_not_routed_to(pbx, emulator):
    pbx.set("calls", "route_to_responsible", "yes")
    emulator.set_user(emulator.people["102"], active=False)
    run = pbx.run(["incoming", "+79161234567"], linkedid="1795601000.1")
    assert run.set_variables["BITRIX_STATUS"] == "OK" and run.set_variables["BITRIX_RESPONSIBLE"] == ""
    assert only_call(emulator)["register"]["USER_PHONE_INNER"] == "101"
    assert "not an active employee" in pbx.log()[-1]["route_note"]
