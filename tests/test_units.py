"""Unit tests: status mapping, number normalization, AGI escaping, settings overrides."""
from __future__ import annotations

import pytest

from agi_bitrix import phones
from agi_bitrix.agi.session import quote
from agi_bitrix.bitrix import query
from agi_bitrix.settings import SettingsError, load
from agi_bitrix.statuses import status_code


@pytest.mark.parametrize("dialstatus,direction,answered,code", [
    ("ANSWER", "incoming", False, "200"), ("NOANSWER", "incoming", False, "304"),
    ("BUSY", "outgoing", False, "486"), ("CANCEL", "incoming", False, "603-S"),
    ("CONGESTION", "outgoing", False, "503"), ("CHANUNAVAIL", "outgoing", False, "480"),
    ("", "incoming", False, "304"), ("", "outgoing", False, "603-S"), ("", "incoming", True, "200"),
    ("DONTCALL", "incoming", False, "OTHER"), ("answer", "incoming", False, "200"),
])
def test_status_mapping(dialstatus, direction, answered, code):
    assert status_code(dialstatus, direction, answered) == code


@pytest.mark.parametrize("raw,expected", [
    ("89161234567", "+79161234567"), ("79161234567", "+79161234567"), ("9161234567", "+79161234567"),
    ("+7 (916) 123-45-67", "+79161234567"), ("8 495 123-45-67", "+74951234567"),
    ("+442079460958", "+442079460958"), ("101", "101"), ("anonymous", "0000"), ("", "0000"),
    ("Unknown", "0000"), ("12&34", "0000"), ("abc", "0000"), ("1" * 100, "0000"),
])
def test_caller_number(raw, expected):
    assert phones.caller_number(raw, "RU", "0000")[0] == expected


@pytest.mark.parametrize("raw,fmt,expected", [
    ("89161234567", "e164", "+79161234567"), ("89161234567", "e164_digits", "79161234567"),
    ("+79161234567", "national", "89161234567"), ("+442079460958", "national", "810442079460958"),
])
def test_dialable(raw, fmt, expected):
    assert phones.dialable(raw, "RU", fmt) == expected


@pytest.mark.parametrize("raw", ["100&PJSIP/x", "8916,123", "abc", "", "123", "+7916123\n4567", "9161234567@t"])
def test_dialable_refuses(raw):
    with pytest.raises(phones.InvalidNumber):
        phones.dialable(raw, "RU")


def test_dial_string_gate():
    assert phones.dial_string("PJSIP/{number}@trunk", "+79161234567") == "PJSIP/+79161234567@trunk"
    with pytest.raises(phones.InvalidNumber):
        phones.dial_string("PJSIP/{number}@trunk", "1&PJSIP/2")


@pytest.mark.parametrize("channel,ext", [
    ("PJSIP/102-0000001a", "102"), ("SIP/7001-00ab", "7001"), ("Local/101@operators-00000022;1", "101"),
    ("PJSIP/provider-00000001", None), ("OutgoingSpoolFailed", None), ("", None),
])
def test_extension_from_channel(channel, ext):
    assert phones.extension_from_channel(channel) == ext


@pytest.mark.parametrize("value,wire", [
    ("hello world", '"hello world"'), ('a"b', '"a\\"b"'), ("C:\\new", '"C:\\\\new"'),
    ("line1\nline2\r", '"line1 line2 "'), ("nul\0", '"nul"'),
])
def test_quote(value, wire):
    assert quote(value) == wire


def test_quote_bounds_length():
    assert len(quote("x" * 5000).encode()) <= 1002
    assert len(quote("\u260e" * 2000).encode()) <= 1002


def test_batch_query_encoding():
    assert query.build({"FILTER": {"UF_PHONE_INNER": "1 0&1"}}) == "FILTER[UF_PHONE_INNER]=1%200%261"
    assert query.build({"USER_ID": ["$result[u1][0][ID]", 5]}) == "USER_ID[0]=$result[u1][0][ID]&USER_ID[1]=5"


def test_settings_overrides_env_then_dotenv(tmp_path):
    ini = tmp_path / "settings.ini"
    ini.write_text("[bitrix24]\nwebhook_url = https://a.example/rest/1/aaaa/\n[calls]\ndefault_user = 101\n")
    (tmp_path / ".env").write_text("AGI_BITRIX_CALLS_DEFAULT_USER=102\nAGI_BITRIX_BITRIX24_TIMEOUT=3\n")
    s = load(str(ini), environ={"AGI_BITRIX_CALLS_DEFAULT_USER": "103"})
    assert s.calls.default_user == "103" and s.bitrix24.timeout == 3 and s.bitrix24.mode == "webhook"
    assert "aaaa" in s.secrets()
    with pytest.raises(SettingsError, match="dial_template"):
        load(str(ini), environ={"AGI_BITRIX_ASTERISK_DIAL_TEMPLATE": "PJSIP/x,U(evil)"})


def test_talk_time_prefers_asterisks_count_and_never_rounds_up():
    from agi_bitrix import talktime

    clock = 1_000_000.0  # the clock the test moves
    answered = clock - 6.6  # `answer` ran in U(), before the bridge; hangup 6.6 s later
    assert talktime.talk_seconds(answered, clock, 6) == 6  # Asterisk's ANSWEREDTIME
    assert talktime.talk_seconds(answered, clock, None) == 6  # span floored, not 7
    # ANSWEREDTIME longer than the part itself (attended transfer, pre-answered IVR): not this part's.
    assert talktime.talk_seconds(answered, clock, 40) == 6
    assert talktime.talk_seconds(None, clock, 9) == 9  # no answer seen: Asterisk's count alone
    assert talktime.talk_seconds(None, clock, None) == 0
    assert [talktime.parse_seconds(v) for v in ("7", " 7 ", "", "7s", "-3", "1e3", None)] == [7, 7, None, None,
                                                                                             None, None, None]


def test_operator_times_are_written_in_the_configured_zone_and_name_it(tmp_path):
    from agi_bitrix.dialer.outcomes import _when

    ini = tmp_path / "s.ini"
    ini.write_text("[dialer]\ntimezone = Asia/Vladivostok\n", encoding="utf-8")
    zone = load(str(ini), environ={}).dialer.operator_timezone
    assert zone == "Asia/Vladivostok"
    assert _when(1795000000.0, zone) == "18.11.2026 21:06 (Asia/Vladivostok)"  # 11:06 UTC
    ini.write_text("[dialer]\ntimezone = Mars/Base\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="timezone"):
        load(str(ini), environ={})
