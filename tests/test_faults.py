"""Faults that must never lose a call: a gateway error after the portal did the work, root-owned
state files, an unwritable or full state folder, a full disk while OAuth rotates, a hangup that
never ran."""
from __future__ import annotations

import os
import sqlite3
import time

from conftest import only_call


def _old_recording(folder, name="call.wav"):
    """A recording MixMonitor finished writing a while ago."""
    rec = folder / name
    rec.write_bytes(b"RIFF" + bytes(300))
    os.utime(rec, (time.time() - 60, time.time() - 60))
    return rec


def _expire_backoff(pbx):
    db = sqlite3.connect(str(pbx.state_dir / "agi-bitrix.sqlite3"))
    db.execute("UPDATE outbox SET next_try = 0")
    db.commit()
    db.close()


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
    assert "still waiting 3" in pbx.cli("outbox", "flush").stdout
    emulator.start()
    _expire_backoff(pbx)
    res = pbx.cli("outbox", "flush")
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
