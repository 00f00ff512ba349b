"""How the AGI session reads Asterisk's answers, without pyst2's per-answer console dump."""
from __future__ import annotations

import io

import pytest

from agi_bitrix.agi.session import AGISession


@pytest.fixture
def no_pprint(monkeypatch):
    # pyst2 pretty-prints every answer for a console this wrapper silences: that work is skipped.
    import asterisk.agi

    def refuse(*_a, **_k):
        raise AssertionError("pyst2 formatted an answer")
    monkeypatch.setattr(asterisk.agi.pprint, "pformat", refuse)


def session(answers: str) -> tuple:
    out = io.StringIO()
    return AGISession(io.StringIO(answers), out), out


def test_answers_read_as_asterisk_sends_them(no_pprint):
    s, out = session("200 result=1 (1795000000.1)\n"
                     "200 result=0\n"
                     "510 Invalid or unknown command\n"
                     "520-Invalid command syntax.  Proper usage follows:\n"
                     "Sets a variable to the current channel.\n520 End of proper usage.\n"
                     "200 result=1 (hangup)\n"
                     "511 Command Not Permitted on a dead channel or intercept routine\n"
                     "200 result=-1\n"
                     "HANGUP\n"
                     "200 result=1 (a b)\n")
    assert s.get_variable("CHANNEL(linkedid)") == "1795000000.1"
    assert s.get_variable("NOPE") is None
    assert s.command("FOO").code == 510
    assert s.command("SET VARIABLE").code == 520
    assert s.command("STREAM FILE").result == "-1"  # data `hangup`: as a failed application
    assert s.command("GET VARIABLE", "X").code == 511 and s.dead
    assert s.command("EXEC", "Dial", "x").result == "-1"
    assert not s.hung_up
    assert s.get_variable("Y") == "a b" and s.hung_up  # the HANGUP line before the answer
    assert s.command("GET VARIABLE", "Z").code == 0 and s.closed  # EOF: Asterisk is gone
    assert out.getvalue().splitlines()[0] == 'GET VARIABLE CHANNEL(linkedid)'
