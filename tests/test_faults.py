"""Faults that must never lose a call: a gateway error after the portal did the work, root-owned
state files, an unwritable or full state folder, a full disk while OAuth rotates, a hangup that
never ran."""
from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import STEP_BUDGET, only_call, served


def _old_recording(folder, name="call.wav"):
    """A recording MixMonitor finished writing a while ago."""
    rec = folder / name
    rec.write_bytes(b"RIFF" + bytes(300))
    os.utime(rec, (time.time() - 60, time.time() - 60))
    return rec


def _asterisk_user():
    """uid, gid and the setpriv prefix that run a command as the unprivileged user `nobody`.

    The read-search capability lets it reach the checkout wherever it is (even under /root); it
    gives no right to write anything, which is what these tests are about."""
    if os.geteuid() != 0:
        pytest.skip("acting as root and then as the Asterisk user needs root")
    entry = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
              "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return entry.pw_uid, entry.pw_gid, prefix


@pytest.fixture
def installed_for_nobody(pbx, tmp_path, keep_install_record):
    """`install --owner nobody`, with the settings where a user without capabilities can read
    them (check verifies that the Asterisk user can; pytest's own tmp root is 0700)."""
    _asterisk_user()  # root only
    etc = Path(tempfile.mkdtemp(prefix="agib-etc-"))
    etc.chmod(0o755)
    pbx.settings_file = etc / "settings.ini"
    pbx.write()
    agi_bin = tmp_path / "agi-bin"
    agi_bin.mkdir()
    try:
        res = pbx.cli("install", "--agi-bin", str(agi_bin), "--settings", str(pbx.settings_file), "--owner", "nobody")
        assert res.returncode == 0, res.stderr
        yield agi_bin
    finally:
        shutil.rmtree(etc, ignore_errors=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a disk the test can fill up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(folder)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"this machine does not allow a tmpfs mount: {res.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder):
    """Take every free byte of the disk of `folder`; returns the filler file to free it again."""
    filler = folder / "filler"
    with open(filler, "ab", buffering=0) as fh:
        for chunk in (65536, 4096, 1):
            while True:
                try:
                    fh.write(b"x" * chunk)
                except OSError:
                    break
    return filler


# -- a 5xx after the portal did the work -------------------------------------------------------

def test_gateway_error_after_the_finish_was_done_is_no_dead_letter(pbx, emulator, tmp_path):
    lids = []
    for n, status in enumerate((502, 503, 504)):
        lid = f"1795500000.{n}"
        lids.append(lid)
        rec = _old_recording(tmp_path, f"r{n}.wav")
        pbx.run(["incoming", f"8916123456{n}"], linkedid=lid)
        emulator.fail_next(status, f"HTTP_{status}", body="<html><h1>Bad Gateway</h1></html>",
                           method="telephony.externalcall.finish", after=True)
        run = pbx.run(["hangup", "ANSWER", "5", str(rec)], linkedid=lid, dead=True)
        assert run.set_variables["BITRIX_STATUS"] == "QUEUED"
    assert all(c["finished"] for c in emulator.calls.values())  # the portal did the work
    # The portal is unreachable for the next pass: that attempt surely did not reach it, and
    # must not make the finish forget that the first one may have.
    emulator.stop()
    assert "still waiting 6" in pbx.cli("outbox", "flush").stdout  # three finishes, three recordings
    emulator.start()
    res = pbx.cli("outbox", "flush")  # tries now, whatever the backoff
    assert "delivered 6" in res.stdout and "dead-lettered 0" in res.stdout, res.stdout + res.stderr
    assert len(emulator.calls) == 3
    for call in emulator.calls.values():
        assert call["finished"] and call["status_code"] == "200"
        assert call["record"] is not None  # the recordings are attached
    assert "dead letters: 0" in pbx.cli("outbox", "status").stdout


def test_outbox_retry_revives_finishes_dead_lettered_after_a_gateway_error(pbx, emulator, tmp_path):
    """Dead letters left by an older version, which took "Call is not found" after a 502 as final."""
    rec = _old_recording(tmp_path)
    lid = "1795500100.1"
    pbx.run(["incoming", "89161234567"], linkedid=lid)
    emulator.fail_next(502, "HTTP_502", body="Bad Gateway", method="telephony.externalcall.finish", after=True)
    pbx.run(["hangup", "ANSWER", "5", str(rec)], linkedid=lid, dead=True)
    db = sqlite3.connect(str(pbx.state_dir / "agi-bitrix.sqlite3"))
    db.execute("UPDATE outbox SET state = 'dead', sending_at = NULL, attempts = 2,"
               " last_error = 'telephony.externalcall.finish: HTTP 400 ERROR_CORE (Call is not found)'"
               " WHERE kind = 'finish'")
    db.execute("UPDATE outbox SET state = 'dead', last_error = 'waits' WHERE kind = 'record'")
    db.commit()
    db.close()
    assert "2 dead letter(s)" in pbx.cli("outbox", "retry").stdout
    res = pbx.cli("outbox", "flush")
    assert "delivered 2" in res.stdout and "dead-lettered 0" in res.stdout, res.stdout
    assert only_call(emulator)["record"]["content"] == rec.read_bytes()


def test_call_not_found_without_an_earlier_maybe_delivered_attempt_stays_a_dead_letter(pbx, emulator):
    lid = "1795500200.1"
    pbx.run(["incoming", "89161234567"], linkedid=lid)
    emulator.stop()  # refused connections: no attempt reached the portal
    pbx.run(["hangup", "NOANSWER", ""], linkedid=lid, dead=True)
    emulator.start()
    emulator.fail_next(400, "ERROR_CORE", "Call is not found (call should be registered prior to finishing",
                       method="telephony.externalcall.finish")
    res = pbx.cli("outbox", "flush")
    assert "dead-lettered 1" in res.stdout, res.stdout
    assert not only_call(emulator)["finished"]


# -- root runs a command, the Asterisk user's steps go on ----------------------------------------

def _call_as(pbx, lid, number):
    """Statuses of a whole call answered by 102 (`answer` answers before it delivers: QUEUED)."""
    return [pbx.run(["incoming", number], linkedid=lid).set_variables["BITRIX_STATUS"],
            pbx.run(["answer"], linkedid=lid, channel="PJSIP/102-00000002").set_variables["BITRIX_STATUS"],
            pbx.run(["hangup", "ANSWER", "7"], linkedid=lid, dead=True).set_variables["BITRIX_STATUS"]]


def test_files_made_by_root_commands_belong_to_the_asterisk_user(pbx, emulator, tmp_path, installed_for_nobody):
    uid, _gid, as_asterisk = _asterisk_user()
    res = pbx.cli("check")  # as root, as the install output suggests
    assert res.returncode == 0 and "all good" in res.stdout, res.stdout + res.stderr
    assert "delivered 0" in pbx.cli("outbox", "flush").stdout
    # A worker started by hand as root keeps the database open: its -wal and -shm stay.
    worker = pbx.background("worker", "--interval", "0.2")
    try:
        db = pbx.state_dir / "agi-bitrix.sqlite3"
        pbx.wait_for(lambda: any(e["event"] == "worker_started" for e in pbx.log()), "the worker to start")
        assert os.path.exists(f"{db}-wal") and os.path.exists(f"{db}-shm")
        made = [p for p in pbx.state_dir.iterdir()] + [pbx.log_file]
        assert {p.name: p.stat().st_uid for p in made} == {p.name: uid for p in made}
        pbx.prefix = as_asterisk
        assert _call_as(pbx, "1795500300.1", "89161234567") == ["OK", "QUEUED", "OK"]
    finally:
        worker.terminate()
        worker.wait(10)
    assert only_call(emulator)["finished"]
    steps = [e for e in pbx.log() if e.get("linkedid") == "1795500300.1"]
    assert [e["event"] for e in steps] == ["incoming", "answer", "hangup"]  # in the log, not on stderr
    # Root once more, then the Asterisk user again.
    pbx.prefix = []
    assert pbx.cli("outbox", "flush").returncode == 0 and pbx.cli("check").returncode == 0
    pbx.prefix = as_asterisk
    assert _call_as(pbx, "1795500300.2", "89161234568") == ["OK", "QUEUED", "OK"]


def test_tokens_stored_by_root_belong_to_the_asterisk_user(pbx, emulator, tmp_path, installed_for_nobody):
    _uid, _gid, as_asterisk = _asterisk_user()
    _oauth(pbx, emulator)  # `agi-bitrix auth` run by root
    emulator.expire_access_tokens()
    pbx.prefix = as_asterisk  # the Asterisk user's step renews the pair root stored
    assert _call_as(pbx, "1795500350.1", "89161234567") == ["OK", "QUEUED", "OK"]
    assert emulator.refresh_count == 1 and only_call(emulator)["finished"]


def test_check_names_each_file_the_asterisk_user_cannot_write(pbx, emulator, tmp_path, installed_for_nobody):
    _uid, _gid, as_asterisk = _asterisk_user()
    stray = pbx.state_dir / "oauth-tokens.json"  # e.g. copied in by root from a backup
    stray.write_text("{}")
    stray.chmod(0o600)
    pbx.log_file.write_text("")
    pbx.log_file.chmod(0o644)
    for prefix in ([], as_asterisk):  # run by root or by the Asterisk user itself
        pbx.prefix = prefix
        res = pbx.cli("check")
        assert res.returncode == 1, res.stdout
        line = next(ln for ln in res.stdout.splitlines() if "cannot write" in ln)
        assert line.startswith("PROBLEM") and "Asterisk user nobody" in line
        assert str(stray) in line and str(pbx.log_file) in line
        assert line.endswith(f"run chown -R nobody: {pbx.log_file.parent} {pbx.state_dir}")


# -- OAuth rotation with a full disk ----------------------------------------------------------------

def _oauth(pbx, emulator):
    pbx.values["bitrix24"] = {"portal_url": emulator.base_url, "client_id": emulator.client_id,
                              "client_secret": emulator.client_secret, "oauth_url": emulator.oauth_url,
                              "timeout": STEP_BUDGET}
    pbx.write()
    res = pbx.cli("auth", "--code", emulator.authorization_code())
    assert res.returncode == 0, res.stderr


def test_no_new_token_pair_is_asked_for_without_room_to_keep_it(pbx, emulator, small_disk):
    pbx.set("storage", "state_dir", str(small_disk / "state"))
    _oauth(pbx, emulator)
    assert pbx.run(["incoming", "89161234567"], linkedid="1795500400.1").set_variables["BITRIX_STATUS"] == "OK"
    emulator.expire_access_tokens()
    filler = fill(small_disk)
    res = pbx.cli("check")
    assert "no room" in res.stdout and "none was asked for" in res.stdout, res.stdout
    assert emulator.refresh_count == 0  # the chain is intact: the old refresh token still works
    filler.unlink()
    assert "renewed just now" in pbx.cli("check").stdout
    assert emulator.refresh_count == 1
    assert pbx.run(["hangup", "NOANSWER", ""], linkedid="1795500400.1",
                   dead=True).set_variables["BITRIX_STATUS"] == "OK"


def test_the_disk_filling_up_while_the_new_pair_is_on_its_way_loses_nothing(pbx, emulator, small_disk):
    pbx.set("storage", "state_dir", str(small_disk / "state"))
    _oauth(pbx, emulator)
    assert pbx.run(["incoming", "89161234567"], linkedid="1795500500.1").set_variables["BITRIX_STATUS"] == "OK"
    emulator.expire_access_tokens()
    fillers = []
    emulator.on_request("oauth.token", lambda: fillers.append(fill(small_disk)))
    res = pbx.cli("check")
    assert fillers and emulator.refresh_count == 1
    assert "renewed just now" in res.stdout, res.stdout
    emulator.on_request("oauth.token", None)
    fillers[0].unlink()
    # The stored pair is the new one: the next step needs no refresh and is accepted.
    run = pbx.run(["hangup", "NOANSWER", ""], linkedid="1795500500.1", dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "OK" and emulator.refresh_count == 1


# -- calls whose hangup step never ran ----------------------------------------------------------

def _backdate(pbx, seconds, *linkedids):
    """Time passes for these calls (as if they had started `seconds` ago)."""
    db = sqlite3.connect(str(pbx.state_dir / "agi-bitrix.sqlite3"))
    for lid in linkedids:
        db.execute("UPDATE calls SET started_at = started_at - ? WHERE linkedid = ?", (seconds, lid))
    db.commit()
    db.close()


def _by_external_id(emulator):
    return {c["register"]["EXTERNAL_CALL_ID"]: c for c in emulator.calls.values()}


def test_calls_whose_hangup_never_ran_are_closed_after_max_call_length(pbx, emulator):
    pbx.set("calls", "max_call_length", "3600")
    with served(pbx) as steps:  # the calls' steps need no process of their own here
        steps.run(["incoming", "89161234561"], linkedid="1795500600.1")
        steps.run(["answer"], linkedid="1795500600.1", channel="PJSIP/102-00000002")  # talked, then killed
        steps.run(["incoming", "89161234562"], linkedid="1795500600.2")               # rang, PBX restarted
        steps.run(["outgoing", "103", "89161234563"], linkedid="1795500600.3")         # dialed out, killed
        steps.run(["incoming", "89161234564"], linkedid="1795500600.4")
        steps.run(["hangup", "NOANSWER", ""], linkedid="1795500600.4", dead=True)      # a normal call
        steps.run(["incoming", "89161234565"], linkedid="1795500600.5")                # still going on
    _backdate(pbx, 3700, "1795500600.1", "1795500600.2", "1795500600.3", "1795500600.4")
    res = pbx.cli("outbox", "flush")
    assert "closed 3 call(s) whose hangup never ran" in res.stdout, res.stdout + res.stderr
    calls = _by_external_id(emulator)
    talked, missed, dialed = calls["1795500600.1"], calls["1795500600.2"], calls["1795500600.3"]
    assert talked["finished"] and talked["status_code"] == "200"
    assert talked["finish_user_id"] == emulator.people["102"]  # who answered it
    assert missed["finished"] and missed["status_code"] == "304"
    assert missed["finish"]["FAILED_REASON"] == "no hangup was reported within max_call_length"
    assert dialed["finished"] and dialed["status_code"] == "603-S"
    assert dialed["finish_user_id"] == emulator.people["103"]
    assert not calls["1795500600.5"]["finished"]
    assert len(emulator.requests_for("telephony.externalcall.finish")) == 4  # .4 once, by its hangup
    closed = {e["linkedid"]: e for e in pbx.log() if e["event"] == "call_closed_unfinished"}
    assert sorted(closed) == ["1795500600.1", "1795500600.2", "1795500600.3"]
    assert closed["1795500600.1"]["level"] == "warning" and closed["1795500600.1"]["status_code"] == "200"
    # Closed once: a later hangup step (a very late one) changes nothing, nor does another pass.
    late = pbx.run(["hangup", "ANSWER", "5"], linkedid="1795500600.2", dead=True)
    assert late.set_variables["BITRIX_STATUS"] == "OK"
    assert "closed" not in pbx.cli("outbox", "flush").stdout
    assert len(emulator.requests_for("telephony.externalcall.finish")) == 4


def test_the_worker_closes_a_call_whose_hangup_never_ran(pbx, emulator):
    pbx.set("calls", "max_call_length", "600")
    pbx.run(["incoming", "89161234567"], linkedid="1795500700.1")
    _backdate(pbx, 700, "1795500700.1")
    worker = pbx.background("worker", "--interval", "0.2")
    try:
        pbx.wait_for(lambda: only_call(emulator)["finished"], "the worker to close the call")
    finally:
        worker.terminate()
        assert worker.wait(10) == 0
    assert only_call(emulator)["finished"] and only_call(emulator)["status_code"] == "304"
    assert [e["linkedid"] for e in pbx.log() if e["event"] == "call_closed_unfinished"] == ["1795500700.1"]


# -- an unwritable or full state folder ----------------------------------------------------------

def _statuses(runs):
    return [r.set_variables["BITRIX_STATUS"] for r in runs]


def _step_lines(pbx, lid):
    return [e for e in pbx.log() if e.get("linkedid") == lid and e["event"] in ("incoming", "answer", "hangup")]


def test_read_only_state_dir_delivers_directly_and_keeps_the_rest_for_replay(pbx, emulator, tmp_path, installed_for_nobody):
    _uid, _gid, as_asterisk = _asterisk_user()
    rec = _old_recording(tmp_path)
    pbx.state_dir.chmod(0o555)  # e.g. a mistaken chmod: the Asterisk user cannot write there
    pbx.prefix = as_asterisk
    # 1: Bitrix24 is up: the whole call goes straight through, the recording too.
    runs = [pbx.run(["incoming", "89161234561"], linkedid="1795500800.1"),
            pbx.run(["answer"], linkedid="1795500800.1", channel="PJSIP/102-00000002"),
            pbx.run(["hangup", "ANSWER", "5", str(rec)], linkedid="1795500800.1", dead=True)]
    assert _statuses(runs) == ["OK", "QUEUED", "OK"]  # `answer` answers Asterisk before it delivers
    assert [e["status"] for e in _step_lines(pbx, "1795500800.1")] == ["OK", "OK", "OK"]
    # 2: Bitrix24 is down for the whole call; 3: down only at the hangup.
    pbx.run(["incoming", "89161234563"], linkedid="1795500800.3")
    emulator.stop()
    runs = [pbx.run(["incoming", "89161234562"], linkedid="1795500800.2"),
            pbx.run(["hangup", "BUSY", ""], linkedid="1795500800.2", dead=True),
            pbx.run(["hangup", "NOANSWER", ""], linkedid="1795500800.3", dead=True)]
    assert _statuses(runs) == ["ERROR", "ERROR", "ERROR"]
    spill = pbx.log_file.with_name("agi-bitrix.undelivered.jsonl")
    for lid, number in (("1795500800.2", "+79161234562"), ("1795500800.3", "+79161234563")):
        last = _step_lines(pbx, lid)[-1]
        assert "not delivered, kept in this log line and " + str(spill) in last["reason"]
        kept = last["undelivered"][0]
        assert kept["call"]["phone"] == number and "finish" in [e["kind"] for e in kept["entries"]]
    first = _step_lines(pbx, "1795500800.2")[0]
    assert first["undelivered"][0]["entries"][0]["payload"]["PHONE_NUMBER"] == "+79161234562"
    call1 = _by_external_id(emulator)["1795500800.1"]
    assert call1["finished"] and call1["status_code"] == "200" and call1["record"]["content"] == rec.read_bytes()
    res = pbx.cli("check")  # as the Asterisk user
    assert f"PROBLEM  outbox     3 call(s) kept in {spill} while {pbx.state_dir} could not be written: " \
           f"once it can, run agi-bitrix outbox replay {spill}" in res.stdout, res.stdout
    # The disk is fixed and Bitrix24 is back: the administrator replays the spill file.
    emulator.start()
    pbx.state_dir.chmod(0o750)
    assert "3 call(s) kept in" in pbx.cli("check").stdout
    res = pbx.cli("outbox", "replay", str(spill))
    assert res.returncode == 0, res.stderr
    assert "dead-lettered 0" in res.stdout and "still waiting 0" in res.stdout, res.stdout
    calls = _by_external_id(emulator)
    assert sorted(calls) == ["1795500800.1", "1795500800.2", "1795500800.3"]
    assert [calls[k]["status_code"] for k in sorted(calls)] == ["200", "486", "304"]
    assert all(c["finished"] and c["register_count"] == 1 for c in calls.values())
    finishes = len(emulator.requests_for("telephony.externalcall.finish"))
    # Replaying the log as well (it holds the same records) changes nothing.
    res = pbx.cli("outbox", "replay", str(pbx.log_file), str(spill))
    assert "0 entr(y/ies) journaled" in res.stdout and "delivered 0" in res.stdout, res.stdout
    assert len(emulator.requests_for("telephony.externalcall.finish")) == finishes
    status = pbx.cli("outbox", "status").stdout
    assert "waiting: 0" in status and "dead letters: 0" in status
    assert "call(s) kept in" not in pbx.cli("check").stdout  # the spill file is replayed


def test_a_database_that_cannot_be_read_never_makes_a_hangup_silently_do_nothing(pbx, emulator):
    assert pbx.run(["incoming", "89161234567"], linkedid="1795500850.1").set_variables["BITRIX_STATUS"] == "OK"
    db = pbx.state_dir / "agi-bitrix.sqlite3"
    db.write_bytes(b"damaged" * 1000)  # e.g. a botched restore from a backup
    run = pbx.run(["hangup", "ANSWER", "5"], linkedid="1795500850.1", dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "ERROR"
    line = _step_lines(pbx, "1795500850.1")[-1]
    assert line["reason"].endswith("the call's state cannot be read either"), line
    assert "is unusable: file is not a database" in pbx.cli("check").stdout


def test_full_disk_delivers_directly_and_keeps_the_rest_for_replay(pbx, emulator, small_disk):
    pbx.set("storage", "state_dir", str(small_disk / "state"))
    assert pbx.run(["incoming", "89161234561"], linkedid="1795500900.1").set_variables["BITRIX_STATUS"] == "OK"
    filler = fill(small_disk)
    # 1 was journaled before the disk filled up; 2 starts on the full disk; 3 while Bitrix24 is down.
    runs = [pbx.run(["answer"], linkedid="1795500900.1", channel="PJSIP/102-00000002"),
            pbx.run(["hangup", "ANSWER", "5"], linkedid="1795500900.1", dead=True),
            pbx.run(["incoming", "89161234562"], linkedid="1795500900.2")]
    assert _statuses(runs) == ["QUEUED", "OK", "OK"]  # `answer` answers Asterisk before it delivers
    lines = _step_lines(pbx, "1795500900.1")[1:] + _step_lines(pbx, "1795500900.2")
    assert [e["status"] for e in lines] == ["OK", "OK", "OK"]
    assert all(e["level"] == "warning" and "state database" in e["state_problem"] for e in lines)
    emulator.stop()
    runs = [pbx.run(["hangup", "NOANSWER", ""], linkedid="1795500900.2", dead=True),
            pbx.run(["incoming", "89161234563"], linkedid="1795500900.3"),
            pbx.run(["hangup", "BUSY", ""], linkedid="1795500900.3", dead=True)]
    assert _statuses(runs) == ["ERROR", "ERROR", "ERROR"]
    emulator.start()
    filler.unlink()
    res = pbx.cli("outbox", "replay", str(pbx.log_file.with_name("agi-bitrix.undelivered.jsonl")))
    assert res.returncode == 0 and "dead-lettered 0" in res.stdout, res.stdout + res.stderr
    calls = _by_external_id(emulator)
    assert [calls[k]["status_code"] for k in sorted(calls)] == ["200", "304", "486"]
    assert all(c["finished"] and c["register_count"] == 1 for c in calls.values())
    assert len(emulator.requests_for("telephony.externalcall.finish")) == 3
    status = pbx.cli("outbox", "status").stdout
    assert "waiting: 0" in status and "dead letters: 0" in status
    # The journal knows all three are finished: nothing is closed as abandoned later.
    db = sqlite3.connect(str(small_disk / "state" / "agi-bitrix.sqlite3"))
    assert db.execute("SELECT COUNT(*) FROM calls WHERE finish_claimed IS NULL").fetchone()[0] == 0
    db.close()
