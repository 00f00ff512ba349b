"""Hostile and broken input: the process still answers AGI correctly, sets BITRIX_STATUS,
logs one line with the reason, exits 0, and nothing reaches an AGI command or a dial string raw.
The fake Asterisk is strict: a value that starts a second command fails the run."""
from __future__ import annotations

import pytest

from conftest import WEBHOOK_CODE, only_call

HOSTILE_CALLER_IDS = [
    'a"b',
    "12\\34",
    "123\nEXEC System reboot",
    "100&PJSIP/evil@trunk",
    "100,,U(evil)",
    "DROP TABLE",
    "7" * 5000,
    "anonymous",
    "",
    "unknown",
    "+7 (916) 123-45-67 ext 5",
]


@pytest.mark.parametrize("caller", HOSTILE_CALLER_IDS)
def test_hostile_caller_id_argument(pbx, emulator, caller):
    run = pbx.run(["incoming", caller, "74951234567"], linkedid="7.1")
    assert run.returncode == 0 and not run.violations
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    call = only_call(emulator)
    phone = call["register"]["PHONE_NUMBER"]
    assert phone == "0000" or phone.lstrip("+").isdigit()
    if phone == "0000":  # a hidden caller is nobody: no lead for him
        assert call["register"]["CRM_CREATE"] == 0 and not emulator.leads
    assert len(pbx.log()) == 1


@pytest.mark.parametrize("callerid", ['Evil "Name', "x\\", "12;34", "\u260e\u00fc"])
def test_hostile_values_in_the_environment_block(pbx, emulator, callerid):
    run = pbx.run(["incoming"], linkedid="7.2", callerid=callerid, calleridname='"; EXEC System x')
    assert run.returncode == 0 and not run.violations
    assert run.set_variables["BITRIX_STATUS"] == "OK"


def test_newline_in_the_environment_block_does_not_desync(pbx, emulator):
    # A caller name with a raw newline spills a fake line into the block, as real Asterisk would.
    run = pbx.run(["incoming", "89161234567"], linkedid="7.3",
                  agi_env={"agi_calleridname": "Mallory\nagi_extension: 666\n200 result=1 (spoof)"})
    assert run.returncode == 0 and not run.violations
    assert run.set_variables.get("BITRIX_STATUS") == "OK"  # the spilled lines change nothing
    assert only_call(emulator)["register"]["PHONE_NUMBER"] == "+79161234567"
    assert len(pbx.log()) == 1


def test_hostile_dialed_number_never_reaches_dial(pbx, emulator):
    for number in ["100&PJSIP/evil", "8916,1234567", "+7916123456\n7", "letters", "", "12", "0" * 5000,
                   "9161234567@trunk", "916/1234567"]:
        run = pbx.run(["dial", number, "101"], linkedid="7.4")
        assert run.returncode == 0 and not run.violations
        assert run.executed_apps() == [], number
        assert run.set_variables["BITRIX_STATUS"] == "ERROR"
    assert emulator.calls == {}


def test_hostile_outgoing_and_answer_and_hangup_args(pbx, emulator):
    run = pbx.run(["outgoing", "10\"1", "8916"], linkedid="7.5")
    assert run.set_variables["BITRIX_STATUS"] == "ERROR"
    pbx.run(["incoming", "89161234567"], linkedid="7.6")
    run = pbx.run(["answer", "1\n02"], linkedid="7.6")
    assert run.set_variables["BITRIX_STATUS"] == "OK" and not run.violations
    run = pbx.run(["hangup", "ANSWER\nNOOP", "99999999999999", "/etc/passwd"], linkedid="7.6", dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "OK" and not run.violations
    call = only_call(emulator)
    assert call["status_code"] == "OTHER" and call["record"] is None


def test_unknown_event_and_no_event(pbx, emulator):
    run = pbx.run(["launch-missiles"], linkedid="8.1")
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "ERROR"
    assert "unknown event" in pbx.log()[-1]["reason"]
    run = pbx.run([], linkedid="8.2")
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "ERROR"
    assert emulator.calls == {}


def test_forty_junk_arguments(pbx, emulator):
    run = pbx.run(["incoming", "89161234567", "74951234567"] + [f"junk{i}\"," for i in range(40)], linkedid="8.3")
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "OK" and not run.violations
    assert pbx.log()[-1]["ignored_args"] == 42 - 8


def test_missing_settings_file(pbx, emulator, tmp_path):
    log = tmp_path / "fallback.log"
    run = pbx.run(["incoming", "89161234567"], linkedid="8.4",
                  env={"AGI_BITRIX_SETTINGS": str(tmp_path / "nope.ini"), "AGI_BITRIX_LOGGING_FILE": str(log)})
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "ERROR"
    assert "not found" in log.read_text()


@pytest.mark.parametrize("text,expect", [
    ("[bitrix24\nwebhook_url = x\n", "broken"),
    ("[calls]\ndefault_user = abc\n", "default_user"),
    ("[bitrix24]\nwebhook_url = http://portal.example/rest/1/x/\n", "https"),
    ("[bitrix24]\ntimeout = soon\n", "timeout"),
    ("[nonsense]\nx = 1\n", "unknown section"),
    ("[calls]\nfavourite_colour = red\n", "unknown key"),
    ("\xff\xfe garbage", "UTF-8"),
])
def test_broken_settings(pbx, emulator, tmp_path, text, expect):
    bad = tmp_path / "bad.ini"
    bad.write_bytes(text.encode("latin-1"))
    log = tmp_path / "fallback.log"
    run = pbx.run(["incoming", "89161234567"], linkedid="8.5",
                  env={"AGI_BITRIX_SETTINGS": str(bad), "AGI_BITRIX_LOGGING_FILE": str(log)})
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "ERROR"
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and expect in lines[0]


def test_secrets_never_reach_the_log_or_stderr(pbx, emulator):
    pbx.run(["incoming", "89161234567"], linkedid="8.6")
    emulator.stop()  # portal gone: errors mention the URL, which holds the secret
    run = pbx.run(["hangup", "ANSWER", "3"], linkedid="8.6", dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "QUEUED"
    text = pbx.log_text()
    assert "unreachable" in text.lower() or "UNREACHABLE" in text
    assert WEBHOOK_CODE not in text and WEBHOOK_CODE not in run.stderr


def test_nothing_but_agi_on_stdout_and_silence_on_stderr(pbx, emulator):
    run = pbx.run(["incoming", "89161234567"], linkedid="8.7")
    for line in run.stdout_raw.decode().splitlines():
        assert line.split(" ")[0] in {"GET", "SET", "EXEC", "VERBOSE"}
    assert run.stderr == ""  # pyst2's chatter never reaches Asterisk's console


def test_unwritable_state_dir(pbx, emulator, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    pbx.set("storage", "state_dir", str(blocker / "state"))
    run = pbx.run(["incoming", "89161234567"], linkedid="8.8")
    # Not journaled, but delivered directly (README: a full disk or an unwritable state_dir).
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "OK"
    line = pbx.log()[-1]
    assert line["level"] == "warning" and "state database" in line["state_problem"]
    assert len(emulator.calls) == 1
