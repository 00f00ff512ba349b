"""Call scenarios end to end: fake Asterisk -> agi-bitrix (process mode, and FastAGI through
`agi-bitrix service`) -> Bitrix24 emulator."""
from __future__ import annotations

import os
import time

import pytest
from conftest import HELD, only_call


@pytest.fixture
def pbx(any_pbx):
    """Every call scenario runs through both transports: process mode and FastAGI."""
    return any_pbx

INBOUND = dict(channel="PJSIP/provider-00000001", context="bitrix-inbound", extension="74951234567",
               dnid="74951234567")


def test_incoming_answered_by_another_employee_of_the_ring_group(pbx, emulator, tmp_path):
    lid = "1795247072.10"
    run = pbx.run(["incoming", "", "74951234567"], linkedid=lid, callerid="+7 (916) 123-45-67", **INBOUND)
    assert run.returncode == 0
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    call = only_call(emulator)
    assert run.set_variables["BITRIX_CALL_ID"] == call["CALL_ID"]
    reg = call["register"]
    assert reg["TYPE"] == 2 and reg["PHONE_NUMBER"] == "+79161234567"
    assert reg["EXTERNAL_CALL_ID"] == lid and reg["LINE_NUMBER"] == "+74951234567"
    assert reg["USER_PHONE_INNER"] == "101" and reg["CRM_CREATE"] == 1
    assert "+" in reg["CALL_START_DATE"][19:] or "-" in reg["CALL_START_DATE"][19:]  # has an offset
    assert call["shown"] == [emulator.people["101"]]
    assert call["crm_entity_type"] == "CONTACT"  # the known client

    # Boris (102) picks up: the U() gosub runs `answer` on his leg; EXT comes from the channel name.
    run = pbx.run(["answer"], linkedid=lid, channel="PJSIP/102-0000000a", uniqueid="1795247072.12")
    assert run.set_variables["BITRIX_STATUS"] == "QUEUED"  # the card move is delivered after the step
    call = only_call(emulator)
    assert call["shown"] == [emulator.people["102"]]
    assert ("hide", emulator.people["101"]) in [tuple(e) for e in call["card_events"]]
    assert len(emulator.requests_for("batch")) == 1  # lookup + show + hide in one request

    pbx.advance(6.6)  # bridged 6.01 s after the U() gosub, hangup handler a moment later
    run = pbx.run(["hangup", "ANSWER", "6"], linkedid=lid, dead=True, **INBOUND)
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    call = only_call(emulator)
    assert call["finished"] and call["status_code"] == "200"
    assert call["finish_user_id"] == emulator.people["102"]  # attributed to whoever answered
    assert call["duration"] == 6  # Asterisk's own count, not the 6.6 s since the `answer` step
    line = [e for e in pbx.log() if e["event"] == "hangup"][-1]
    assert line["linkedid"] == lid and line["status"] == "OK"


def test_missed_call_from_unknown_number_creates_lead_and_finishes_304(pbx, emulator):
    lid = "1795247080.1"
    assert pbx.run(["incoming", "89031112233", "74951234567"], linkedid=lid).set_variables["BITRIX_STATUS"] == "OK"
    run = pbx.run(["hangup", "NOANSWER", ""], linkedid=lid, dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    call = only_call(emulator)
    assert call["register"]["PHONE_NUMBER"] == "+79031112233"
    assert call["crm_created_lead"] and len(emulator.leads) == 1
    assert call["status_code"] == "304" and call["duration"] == 0
    assert call["finish_user_id"] == emulator.people["101"]


def test_outgoing_busy_finishes_486(pbx, emulator):
    lid = "1795247090.5"
    run = pbx.run(["outgoing", "103", "8 495 765-43-21"], linkedid=lid, channel="PJSIP/103-00000005")
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    pbx.run(["hangup", "BUSY", ""], linkedid=lid, dead=True, channel="PJSIP/103-00000005")
    call = only_call(emulator)
    assert call["type"] == 1 and call["register"]["PHONE_NUMBER"] == "+74957654321"
    assert call["user_id"] == emulator.people["103"]
    assert call["status_code"] == "486" and call["finish"]["FAILED_REASON"] == "BUSY"


def test_events_without_arguments_take_defaults_from_the_environment(pbx, emulator):
    lid = "1795247100.7"
    run = pbx.run(["incoming"], linkedid=lid, callerid="9161234567", dnid="unknown", extension="74950000001")
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    reg = only_call(emulator)["register"]
    assert reg["PHONE_NUMBER"] == "+79161234567" and reg["LINE_NUMBER"] == "+74950000001"
    run = pbx.run(["hangup"], linkedid=lid, dead=True, variables={"DIALSTATUS": "BUSY"})
    assert "GET VARIABLE DIALSTATUS" in run.commands
    assert only_call(emulator)["status_code"] == "486"

    lid = "1795247100.9"
    run = pbx.run(["outgoing"], linkedid=lid, callerid="102", extension="84951112233",
                  channel="PJSIP/102-00000009")
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    regs = [c["register"] for c in emulator.calls.values() if c["register"]["EXTERNAL_CALL_ID"] == lid]
    assert regs and regs[0]["USER_PHONE_INNER"] == "102" and regs[0]["PHONE_NUMBER"] == "+74951112233"


def test_empty_dialstatus_means_missed_incoming_and_cancelled_outgoing(pbx, emulator):
    pbx.run(["incoming", "89031112233"], linkedid="1.1")
    pbx.run(["hangup", "", ""], linkedid="1.1", dead=True)
    pbx.run(["outgoing", "101", "89031112233"], linkedid="2.1")
    pbx.run(["hangup", "", ""], linkedid="2.1", dead=True)
    codes = {c["register"]["EXTERNAL_CALL_ID"]: c["status_code"] for c in emulator.calls.values()}
    assert codes == {"1.1": "304", "2.1": "603-S"}


def test_finish_happens_exactly_once_when_every_leg_runs_hangup(pbx, emulator):
    lid = "1795247110.1"
    pbx.run(["incoming", "89161234567"], linkedid=lid)
    first = pbx.run(["hangup", "ANSWER", "5"], linkedid=lid, dead=True, channel="Local/s@x-0001;1")
    second = pbx.run(["hangup", "ANSWER", "5"], linkedid=lid, dead=True, channel="Local/s@x-0001;2")
    assert first.set_variables["BITRIX_STATUS"] == second.set_variables["BITRIX_STATUS"] == "OK"
    assert len(emulator.requests_for("telephony.externalcall.finish")) == 1
    assert only_call(emulator)["duration"] == 5  # no answer event seen: ANSWEREDTIME counts


def test_dial_validates_registers_and_emits_one_dial(pbx, emulator):
    lid = "1795247120.3"

    def dial(fake, options):
        fake.variables.update(DIALSTATUS="ANSWER", ANSWEREDTIME="4")
        return 0

    run = pbx.run(["dial", "8 (916) 765-43-21", "101"], linkedid=lid, channel="PJSIP/101-00000003",
                  apps={"Dial": dial})
    assert run.executed_apps() == [("Dial", "PJSIP/+79167654321@provider,45")]
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    call = only_call(emulator)
    assert run.set_variables["BITRIX_CALL_ID"] == call["CALL_ID"]
    assert call["type"] == 1 and call["register"]["PHONE_NUMBER"] == "+79167654321"
    # The call id is on the channel before Dial blocks, for the hangup handler.
    exec_index = next(i for i, c in enumerate(run.commands) if c.startswith("EXEC Dial"))
    assert any(c.startswith("SET VARIABLE BITRIX_CALL_ID") for c in run.commands[:exec_index])
    # The step ends in one place: its status is set once, before Dial, and not again after it.
    statuses = [i for i, c in enumerate(run.commands) if c.startswith("SET VARIABLE BITRIX_STATUS")]
    assert len(statuses) == 1 and statuses[0] < exec_index
    assert [e["dialstatus"] for e in pbx.log() if e["event"] == "dial"] == ["ANSWER"]
    pbx.run(["hangup", "ANSWER", "4"], linkedid=lid, dead=True)
    assert only_call(emulator)["status_code"] == "200"


def test_dial_number_format_and_options_from_settings(pbx, emulator):
    pbx.set("asterisk", "number_format", "national")
    pbx.set("asterisk", "dial_options", "gT")
    run = pbx.run(["dial", "+7 916 765 43 21"], linkedid="5.5")
    assert run.executed_apps() == [("Dial", "PJSIP/89167654321@provider,45,gT")]
    assert emulator.calls == {}  # no EXT: nothing to register
    pbx.set("asterisk", "number_format", "e164_digits")
    run = pbx.run(["dial", "+44 20 7946 0958"], linkedid="5.6")
    assert run.executed_apps() == [("Dial", "PJSIP/442079460958@provider,45,gT")]


def test_caller_hangs_up_during_a_slow_register(pbx, emulator):
    emulator.set_delay(1.0, method="telephony.externalcall.register")
    run = pbx.run(["incoming", "89161234567"], linkedid="1795247130.1", hangup_after=0.4)
    assert run.sighup_sent and run.returncode == 0
    assert run.set_variables["BITRIX_STATUS"] == "OK"  # SET VARIABLE works on a dead channel
    call = only_call(emulator)
    assert run.set_variables["BITRIX_CALL_ID"] == call["CALL_ID"]
    entry = pbx.log()[-1]
    assert entry["event"] == "incoming" and entry["hung_up"] is True and entry["linkedid"] == "1795247130.1"


def test_slow_portal_never_holds_the_caller_beyond_the_budget(pbx, emulator):
    pbx.set("bitrix24", "timeout", pbx.short_budget)
    emulator.hold("telephony.externalcall.register")  # the portal is stuck until the test ends
    run = pbx.run(["incoming", "89161234567"], linkedid="1795247140.1")
    assert run.returncode == 0 and run.duration < HELD
    assert run.set_variables["BITRIX_STATUS"] == "QUEUED" and run.set_variables["BITRIX_CALL_ID"] == ""
    entry = pbx.log()[-1]
    assert entry["queued"] == ["register"] and "TIMEOUT" in entry["reason"]


def test_portal_errors_are_logged_with_the_payload(pbx, emulator):
    emulator.fail_next(400, "ERROR_CORE", "User is not found or is not active",
                       method="telephony.externalcall.register")
    run = pbx.run(["incoming", "89161234567"], linkedid="9.9")
    assert run.set_variables["BITRIX_STATUS"] == "ERROR" and run.set_variables["BITRIX_CALL_ID"] == ""
    assert "User is not found" in pbx.log()[-1]["reason"]
    run = pbx.run(["hangup", "ANSWER", "3"], linkedid="9.9", dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "ERROR"
    assert "dead-lettered register" in pbx.log()[-1]["reason"]


def test_route_to_responsible_manager(pbx, emulator):
    pbx.set("calls", "route_to_responsible", "yes")
    run = pbx.run(["incoming", "+79161234567"], linkedid="3.1")
    assert run.set_variables["BITRIX_RESPONSIBLE"] == "102"
    assert only_call(emulator)["register"]["USER_PHONE_INNER"] == "102"
    run = pbx.run(["incoming", "+79035550000"], linkedid="3.2")  # unknown client: default route
    assert run.set_variables["BITRIX_RESPONSIBLE"] == ""


def test_recording_is_attached_after_finish(pbx, emulator, tmp_path):
    rec = tmp_path / "rec-1.wav"
    rec.write_bytes(b"RIFF....WAVEfmt " + bytes(64))
    os.utime(rec, (time.time() - 30, time.time() - 30))  # MixMonitor closed it a while ago
    pbx.run(["incoming", "89161234567"], linkedid="4.1")
    pbx.run(["hangup", "ANSWER", "7", str(rec)], linkedid="4.1", dead=True)
    call = only_call(emulator)
    assert call["record"]["filename"] == "rec-1.wav" and call["record"]["content"] == rec.read_bytes()

    ogg = tmp_path / "rec-2.ogg"
    ogg.write_bytes(b"OggS")
    pbx.run(["incoming", "89161234568"], linkedid="4.2")
    run = pbx.run(["hangup", "ANSWER", "7", str(ogg)], linkedid="4.2", dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "OK"  # the call itself is finished
    assert "only wav and mp3" in pbx.log()[-1]["recording_note"]


def test_many_processes_at_once_one_finish(pbx, emulator):
    """Asterisk runs a process per call step: concurrent writers share the SQLite state safely."""
    from concurrent.futures import ThreadPoolExecutor

    lids = [f"1795247200.{i}" for i in range(4)]
    pbx.set("bitrix24", "timeout", "60")  # this is about concurrency, not speed: four process starts
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda lid: pbx.run(["incoming", "89161234567"], linkedid=lid), lids))
    assert all(r.set_variables["BITRIX_STATUS"] == "OK" for r in runs)
    assert len(emulator.calls) == 4
    # Every leg of one call runs `hangup` at the same moment: exactly one finish. In process mode
    # the portal holds the first finish until the other legs' steps are done, so they surely run
    # while it is on its way (in the service one courier carries it, and the legs wait for it).
    first = emulator.hold("telephony.externalcall.finish", count=1) if pbx.transport == "process" else None
    with ThreadPoolExecutor(4) as pool:
        legs = [pool.submit(pbx.run, ["hangup", "ANSWER", "5"], linkedid=lids[0], dead=True,
                            channel=f"Local/s@x-0001;{i}") for i in range(4)]
        if first is not None:
            try:
                pbx.wait_for(lambda: sum(leg.done() for leg in legs) == 3, "the other legs' hangup steps")
            finally:
                first.set()
        runs = [leg.result() for leg in legs]
    assert all(r.returncode == 0 and r.set_variables["BITRIX_STATUS"] == "OK" for r in runs)
    assert len(emulator.requests_for("telephony.externalcall.finish")) == 1


def test_sighup_during_the_first_agi_command(pbx, emulator):
    run = pbx.run(["incoming", "89161234567"], linkedid="1795247300.1",
                  hangup_on=lambda line: line.startswith("GET VARIABLE"))
    assert run.sighup_sent and run.returncode == 0
    assert run.set_variables["BITRIX_STATUS"] == "OK" and len(emulator.calls) == 1
    assert pbx.log()[-1]["hung_up"] is True


def test_the_log_line_tells_how_long_the_step_waited_for_the_portal(pbx, emulator):
    emulator.set_delay(0.4, method="telephony.externalcall.register")
    lid = "1795247099.1"
    assert pbx.run(["incoming", "89161234567"], linkedid=lid).set_variables["BITRIX_STATUS"] == "OK"
    line = [e for e in pbx.log() if e.get("linkedid") == lid][-1]
    assert line["requests"] == 1
    assert 400 <= line["portal_ms"] <= line["ms"]  # the portal's 0.4 s, within the step's own time
