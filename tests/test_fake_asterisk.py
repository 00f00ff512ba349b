"""Tests for the strict fake Asterisk AGI peer (agi_bitrix.testing.fake_asterisk)."""
from __future__ import annotations

import json
import signal
import sys
import textwrap
import time

import pytest

from agi_bitrix.testing.fake_asterisk import AGIProtocolError, FakeAsterisk, parse_args

R511 = "511 Command Not Permitted on a dead channel or intercept routine\n"

# A minimal, correct AGI client shared by the throwaway scripts.
PRELUDE = '''
import json, os, signal, sys, time
def read_env():
    env = {}
    while True:
        line = sys.stdin.readline()
        if line in ("\\n", ""):
            return env
        key, _, value = line[:-1].partition(": ")
        env[key] = value
def cmd(line):
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()
    out = [sys.stdin.readline()]
    if out[0].startswith("100 "):
        out.append(sys.stdin.readline())
    while out[0].startswith("520-") and not out[-1].startswith("520 "):
        out.append(sys.stdin.readline())
    return "".join(out)
def quote(value):
    return '"' + value.replace("\\\\", "\\\\\\\\").replace('"', '\\\\"') + '"'
'''


def make(tmp_path, body: str, name: str = "probe.py") -> list:
    path = tmp_path / name
    path.write_text(PRELUDE + textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_parse_args_matches_asterisk():
    assert parse_args('SET VARIABLE Q "a\\"b"') == ["SET", "VARIABLE", "Q", 'a"b']
    assert parse_args('x "C:\\path\\new"') == ["x", "C:pathnew"]
    assert parse_args('ab"c d"e') == ['abc de']
    assert parse_args('SET VARIABLE E ""') == ["SET", "VARIABLE", "E", ""]
    assert parse_args('a\\ b\t c') == ["a b", "c"]
    assert parse_args('SET VARIABLE Q "a"b c""') == ["SET", "VARIABLE", "Q", "ab", "c"]  # -> 520
    assert len(parse_args(" ".join(["w"] * 200))) == 127


def test_well_behaved_script_is_clean(tmp_path):
    value = 'say "hi" C:\\dir\\new'
    script = make(tmp_path, '''
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        env = read_env()
        linked = cmd("GET VARIABLE CHANNEL(linkedid)")
        cmd("SET VARIABLE RESULT " + quote(%r))
        cmd("SET VARIABLE __INHERIT " + quote(linked.strip()))
        cmd('VERBOSE "done" 1')
        cmd("GET VARIABLE RESULT")
    ''' % value)
    run = FakeAsterisk(script, ["a"], linkedid="linked.1").run()
    assert run.violations == [] and run.returncode == 0 and run.agistatus == "SUCCESS"
    assert run.set_variables == {"RESULT": value, "__INHERIT": "200 result=1 (linked.1)"}
    assert run.variables["INHERIT"] == "200 result=1 (linked.1)"
    assert run.exchanges[0] == ("GET VARIABLE CHANNEL(linkedid)", "200 result=1 (linked.1)\n")
    assert run.exchanges[3][1] == "200 result=1\n"
    assert run.exchanges[4][1] == "200 result=1 (%s)\n" % value
    assert not run.sighup_sent and run.variables["AGISTATUS"] == "SUCCESS"


def test_env_block_and_argv(tmp_path):
    script = make(tmp_path, '''
        raw = []
        while True:
            line = sys.stdin.buffer.readline()
            raw.append(line.decode())
            if line in (b"\\n", b""):
                break
        open(sys.argv[1], "w").write(json.dumps({"raw": "".join(raw), "argv": sys.argv[1:],
                                                 "ver": os.environ.get("AST_VERSION"),
                                                 "agidir": os.environ.get("AST_AGI_DIR"),
                                                 "x": os.environ.get("X_EXTRA")}))
    ''', name="envdump.py")
    out = tmp_path / "out.json"
    fa = FakeAsterisk(script, [str(out), "arg two", "", "last"], channel="Local/1@x-00000010;2",
                      callerid="7900000001", calleridname="Doe, John", context="agi-test",
                      extension="h", priority="3", uniqueid="1.5", env={"X_EXTRA": "y"},
                      agi_env={"agi_dnid": "100\nagi_fake: injected", "agi_extra": "e"})
    run = fa.run()
    data = json.loads(out.read_text())
    assert data["argv"] == [str(out), "arg two", "", "last"]
    assert (data["ver"], data["agidir"], data["x"]) == ("22.10.1", "/var/lib/asterisk/agi-bin", "y")
    assert data["raw"] == (
        "agi_request: envdump.py\nagi_channel: Local/1@x-00000010;2\nagi_language: en\n"
        "agi_type: Local\nagi_uniqueid: 1.5\nagi_version: 22.10.1\nagi_callerid: 7900000001\n"
        "agi_calleridname: Doe, John\nagi_callingpres: 0\nagi_callingani2: 0\nagi_callington: 0\n"
        "agi_callingtns: 0\nagi_dnid: 100\nagi_fake: injected\nagi_rdnis: unknown\n"
        "agi_context: agi-test\nagi_extension: h\nagi_priority: 3\nagi_enhanced: 0.0\n"
        "agi_accountcode: \nagi_threadid: 140427056031424\n"
        "agi_arg_1: %s\nagi_arg_2: arg two\nagi_arg_3: \nagi_arg_4: last\nagi_extra: e\n\n" % out)
    assert run.commands == [] and run.returncode == 0
    # Unknown caller -> presentation 67 and type NULL for the spool-failed channel.
    block = FakeAsterisk(["agi-bitrix"], channel="OutgoingSpoolFailed").env_block().decode()
    assert "agi_request: agi-bitrix\n" in block and "agi_type: NULL\n" in block
    assert "agi_callingpres: 67\n" in block and block.endswith("agi_threadid: 140427056031424\n\n")


def test_two_commands_in_one_write_is_a_violation(tmp_path):
    script = make(tmp_path, '''
        read_env()
        os.write(1, b"NOOP\\nNOOP\\n")
        sys.stdin.readline(); sys.stdin.readline()
    ''')
    with pytest.raises(AGIProtocolError) as err:
        FakeAsterisk(script).run()
    assert "second command written before the answer to 'NOOP'" in str(err.value)
    assert err.value.run.exchanges == [("NOOP", "200 result=0\n")] * 2


def test_command_before_reading_answer_is_a_violation(tmp_path):
    script = make(tmp_path, '''
        read_env()
        os.write(1, b"NOOP first\\n"); time.sleep(0.05); os.write(1, b"NOOP second\\n")
        time.sleep(0.05)  # answers are read only now: the first one is still in the pipe
        sys.stdin.readline(); sys.stdin.readline()
    ''')
    run = FakeAsterisk(script, strict=False).run()
    assert any("before the answer to 'NOOP first'" in v for v in run.violations), run.violations


def test_junk_blank_cr_unknown_usage_and_long_line(tmp_path):
    script = make(tmp_path, '''
        read_env()
        r = [cmd("FOOBAR baz"), cmd(""), cmd("ANSWER\\r"), cmd("SET VARIABLE X two words"),
             cmd("GET FULL VARIABLE ${EXTEN} ${CONTEXT} x"), cmd('GET FULL VARIABLE "${EXTEN}@${CONTEXT}"'),
             cmd("SET VARIABLE BIG " + "x" * 9000)]
        r.append(sys.stdin.readline())   # answer to the split-off tail
        open(sys.argv[1], "w").write(json.dumps(r))
    ''')
    out = tmp_path / "r.json"
    run = FakeAsterisk(script, [str(out)], context="ctx", strict=False).run()
    r = json.loads(out.read_text())
    usage = ("520-Invalid command syntax.  Proper usage follows:\n"
             "Sets a variable to the current channel.\n520 End of proper usage.\n")
    assert r[:4] == ["510 Invalid or unknown command\n"] * 3 + [usage]
    assert r[4].startswith("520-") and r[4].endswith("520 End of proper usage.\n")
    assert r[5] == "200 result=1 (s@ctx)\n"
    assert r[6] == "200 result=1\n" and r[7] == "510 Invalid or unknown command\n"
    assert len(run.variables["BIG"]) == 8191 - len("SET VARIABLE BIG ")
    text = "\n".join(run.violations)
    for needle in ("unknown command", "blank line", "carriage return", "(520)", "longer than 8191"):
        assert needle in text
    assert "X" not in run.set_variables


def test_sighup_ignored_script_keeps_working_when_dead(tmp_path):
    script = make(tmp_path, '''
        got = []
        signal.signal(signal.SIGHUP, lambda *a: got.append(1))
        read_env()
        cmd("CHANNEL STATUS")
        cmd("NOOP")   # the caller hangs up here (after the handler is surely in place)
        while not got:
            time.sleep(0.01)
        r = [cmd("GET VARIABLE CHANNEL(linkedid)"), cmd('SET VARIABLE AFTER "hup"'),
             cmd("CHANNEL STATUS"), cmd("GET VARIABLE HANGUPCAUSE"), cmd("EXEC NoOp x")]
        open(sys.argv[1], "w").write(json.dumps(r))
    ''')
    out = tmp_path / "r.json"
    run = FakeAsterisk(script, [str(out)], uniqueid="9.1", hangup_on=lambda line: line == "NOOP").run()
    assert json.loads(out.read_text()) == [
        "200 result=1 (9.1)\n", "200 result=1\n", R511, "200 result=1 (16)\n", "200 result=0\n"]
    assert run.exchanges[0] == ("CHANNEL STATUS", "200 result=6\n")
    assert run.sighup_sent and run.returncode == 0 and run.agistatus == "HANGUP"
    assert run.set_variables == {"AFTER": "hup"} and run.violations == []


def test_script_without_sighup_handler_is_killed(tmp_path):
    script = make(tmp_path, '''
        read_env()
        cmd("NOOP")
        time.sleep(60)
    ''')
    run = FakeAsterisk(script, hangup_after=0.2, timeout=120).run()
    assert run.returncode == -signal.SIGHUP and run.sighup_sent
    assert run.agistatus == "HANGUP" and run.duration < 30   # killed, not slept its 60 s


def test_dead_channel_from_start(tmp_path):
    script = make(tmp_path, '''
        read_env()
        r = [cmd("ANSWER"), cmd('SET VARIABLE DEADSET "x y"'), cmd("GET VARIABLE DEADSET"),
             cmd("CHANNEL STATUS"), cmd("STREAM FILE beep \\"\\""), cmd("DATABASE PUT lab k v"),
             cmd("DATABASE GET lab k"), cmd("FOOBAR"), cmd("EXEC Dial PJSIP/1"),
             cmd("GET VARIABLE DIALSTATUS")]
        open(sys.argv[1], "w").write(json.dumps(r))
    ''')
    out = tmp_path / "r.json"
    run = FakeAsterisk(script, [str(out)], dead=True, extension="h", strict=False).run()
    assert json.loads(out.read_text()) == [
        R511, "200 result=1\n", "200 result=1 (x y)\n", R511, R511, "200 result=1\n",
        "200 result=1 (v)\n", "510 Invalid or unknown command\n", "200 result=-1\n",
        "200 result=1 (CANCEL)\n"]
    assert not run.sighup_sent and run.agistatus == "SUCCESS"
    assert run.violations == ["unknown command (510): 'FOOBAR'"]


def test_exec_dial_handler_and_hangup_during_exec(tmp_path):
    def dial(fa, options):
        fa.variables["DIALSTATUS"] = "BUSY"
        return 0

    def slow(fa, options):
        fa.hangup()  # the caller hangs up while the app runs, however fast this machine is
        return 0

    script = make(tmp_path, '''
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        read_env()
        r = [cmd('EXEC Dial "PJSIP/100,30,tT"'), cmd("GET VARIABLE DIALSTATUS"),
             cmd("EXEC NoSuchApp foo"), cmd('EXEC Set "S=a,b"'), cmd("GET VARIABLE S"),
             cmd("GOSUB sub s 1"), cmd("EXEC Slow"), cmd("ANSWER")]
        open(sys.argv[1], "w").write(json.dumps(r))
    ''')
    out = tmp_path / "r.json"
    run = FakeAsterisk(script, [str(out)], apps={"DIAL": dial, "slow": slow},
                       hangup_on=lambda line: False).run()
    assert json.loads(out.read_text()) == [
        "200 result=0\n", "200 result=1 (BUSY)\n", "200 result=-2\n", "200 result=0\n",
        "200 result=1 (a,b)\n", "100 result=0 Trying...\n200 result=0 Gosub complete\n",
        "200 result=-1\n", R511]
    assert run.executed_apps() == [("Dial", "PJSIP/100,30,tT"), ("NoSuchApp", "foo"),
                                   ("Set", "S=a,b"), ("Slow", "")]
    assert run.variables["S"] == "a,b" and run.set_variables == {}
    assert run.agistatus == "HANGUP" and run.sighup_sent


def test_hangup_on_command_and_hangup_command(tmp_path):
    script = make(tmp_path, '''
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        read_env()
        r = [cmd("CHANNEL STATUS"), cmd("VERBOSE bye"), cmd("CHANNEL STATUS")]
        open(sys.argv[1], "w").write(json.dumps(r))
    ''')
    out = tmp_path / "r.json"
    run = FakeAsterisk(script, [str(out)], hangup_on=lambda line: line.startswith("VERBOSE")).run()
    assert json.loads(out.read_text()) == ["200 result=6\n", "200 result=1\n", R511]
    assert run.sighup_sent and run.agistatus == "HANGUP"
    script = make(tmp_path, '''
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        read_env()
        print(json.dumps([cmd("HANGUP"), cmd("ANSWER")]), file=sys.stderr)
    ''', name="selfhangup.py")
    run = FakeAsterisk(script).run()
    assert json.loads(run.stderr) == ["200 result=1\n", R511] and run.sighup_sent


def test_failure_exit_code_and_failure_line(tmp_path):
    script = make(tmp_path, '''
        read_env()
        cmd("NOOP")
        sys.exit(3)
    ''')
    assert FakeAsterisk(script).run().agistatus == "FAILURE"
    script = make(tmp_path, '''
        read_env()
        sys.stdout.write("failure: could not start\\n"); sys.stdout.flush()
        sys.stdin.read()
    ''', name="fail.py")
    run = FakeAsterisk(script, strict=False).run()
    assert run.agistatus == "FAILURE" and run.exchanges == []
    assert run.commands == ["failure: could not start"]


def test_hanging_script_is_killed_at_timeout(tmp_path):
    script = make(tmp_path, '''
        read_env()
        cmd("NOOP")
        time.sleep(30)
    ''')
    started = time.monotonic()
    with pytest.raises(AGIProtocolError) as err:
        FakeAsterisk(script, timeout=1.0).run()
    assert time.monotonic() - started < 20   # killed at 1 s, not after its 30 s of sleep
    run = err.value.run
    assert run.returncode == -signal.SIGKILL
    assert run.violations == ["script held the channel for 1 s: killed (Asterisk would wait forever)"]
