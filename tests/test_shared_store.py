"""Several PBXs, one portal: the PostgreSQL store they share ([storage] url, pbx_id).

Two PBXs are two settings files and state folders on this machine, one throwaway PostgreSQL
(conftest.pg_cluster) and one Bitrix24 emulator.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import ENTRY, SharedPBX, SharedServicePBX, installs, pg_rows, served
from test_oauth import INBOUND, use_oauth

CALL = ["incoming", "89161234567", "74951234567"]


def statuses(runs):
    return [r.set_variables.get("BITRIX_STATUS") for r in runs]


def wait_for(done, what: str, limit: float = 120.0) -> None:
    end = time.monotonic() + limit
    while not done():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_48_steps_of_two_pbxs_at_the_token_expiry_refresh_it_once(tmp_path, emulator, pg_url):
    """PBX A serves its steps in `agi-bitrix service` (a refresh thread), PBX B runs them as
    processes (a detached child refreshes): one chain of tokens for both, renewed once."""
    a = SharedServicePBX(tmp_path / "a", emulator.webhook_url, pg_url, "office-a")
    b = SharedPBX(tmp_path / "b", emulator.webhook_url, pg_url, "office-b")
    for pbx in (a, b):
        use_oauth(pbx, emulator, timeout="60")
        pbx.set("bitrix24", "rate_burst", "500")  # the budget is another test's matter
    res = b.cli("auth", "--code", stdin=emulator.authorization_code() + "\n")
    assert res.returncode == 0, res.stderr
    a.start()
    try:
        emulator.expire_access_tokens()  # neither PBX holds a valid access token now
        work = [(a, f"1795510000.{i}") for i in range(44)] + [(b, f"1795510100.{i}") for i in range(4)]
        with ThreadPoolExecutor(len(work)) as pool:
            runs = list(pool.map(lambda job: job[0].run(CALL, linkedid=job[1], timeout=120, **INBOUND), work))
    finally:
        a.stop()
    assert statuses(runs) == ["OK"] * 48
    assert emulator.refresh_count == 1 and emulator.spent_refresh_uses == 0
    assert len(emulator.calls) == 48
    pair = pg_rows(pg_url, "SELECT refreshing_until FROM agi_bitrix.tokens")
    assert pair == [{"refreshing_until": None}]  # the renewed pair landed; nobody is left waiting


def test_two_pbxs_at_full_load_stay_inside_one_budget(tmp_path, emulator, pg_url):
    """The portal's bucket, scaled down to seconds: 20 requests, draining 40 a second. Each PBX
    may burst 16 at 30 a second; apart they would burst 32 at once and meet 503s."""
    emulator.set_bucket(20, 40.0)
    pbxs = [SharedServicePBX(tmp_path / name, emulator.webhook_url, pg_url, f"office-{name}") for name in "ab"]
    for pbx in pbxs:
        pbx.set("bitrix24", "rate_burst", "16")
        pbx.set("bitrix24", "rate_per_second", "30")
        pbx.start()
    try:
        work = [(pbx, f"17955200{n}.{i}") for n, pbx in enumerate(pbxs) for i in range(30)]
        with ThreadPoolExecutor(len(work)) as pool:
            runs = list(pool.map(lambda job: job[0].run(CALL, linkedid=job[1], timeout=120), work))
    finally:
        for pbx in pbxs:
            pbx.stop()
    assert statuses(runs) == ["OK"] * 60
    registers = emulator.requests_for("telephony.externalcall.register")
    assert [r["status"] for r in registers].count(503) == 0 and len(registers) == 60


def test_two_dialers_over_the_same_tasks_dial_each_task_once(tmp_path, emulator, pg_url):
    from test_dialer import CallCenter, comments

    from agi_bitrix.testing.fake_ami import FakeAMI, OriginateOutcome

    a = SharedPBX(tmp_path / "a", emulator.webhook_url, pg_url, "office-a")
    b = SharedPBX(tmp_path / "b", emulator.webhook_url, pg_url, "office-b")
    with FakeAMI(username="crm", secret="ami-1") as ami_a, FakeAMI(username="crm", secret="ami-1") as ami_b:
        center = CallCenter(a, emulator, ami_a)
        other = CallCenter.__new__(CallCenter)
        other.pbx, other.emu, other.ami, other.script, other.answered = b, emulator, ami_b, {}, []
        b.values["asterisk"].update(ami_host="127.0.0.1", ami_port=str(ami_b.port), ami_user=ami_b.username,
                                    ami_secret=ami_b.secret)
        b.values["dialer"] = dict(a.values["dialer"])
        b.write()
        ami_b.on_originate(other._decide)
        tasks = [center.task("Позвонить: Иван Петров", ["+7 916 111-22-33"], responsible=center.anna),
                 center.task("Позвонить: Пётр Иванов", ["+7 916 222-33-44"], responsible=center.boris)]
        for c in (center, other):
            c.script["+7916"] = OriginateOutcome(reason=5)  # busy: the attempt ends at once
        env = dict(os.environ)
        env.pop("AST_AGI_DIR", None)
        procs = [subprocess.Popen([str(ENTRY), "dialer", "run", "--once"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=dict(env, AGI_BITRIX_SETTINGS=str(p.settings_file))) for p in (a, b)]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
    dialed = [o.get("ChannelId") for o in ami_a.originates + ami_b.originates]  # dialer-TASK-...
    per_task = {t: sum(1 for v in dialed if v.startswith(f"dialer-{t}-")) for t in tasks}
    assert per_task == {tasks[0]: 1, tasks[1]: 1}, dialed
    rows = pg_rows(pg_url, "SELECT task_id, attempts, last_outcome FROM agi_bitrix.dialer_tasks ORDER BY task_id")
    assert [(r["task_id"], r["attempts"], r["last_outcome"]) for r in rows] == [(t, 1, "busy") for t in sorted(tasks)]
    assert all(len(comments(emulator, t)) == 1 for t in tasks)


def test_pbx_a_killed_with_a_backlog_b_carries_it_once(two_pbxs, emulator):
    a, b = two_pbxs
    emulator.fail_next(500, "INTERNAL_SERVER_ERROR", "boom", method="telephony.externalcall.register", count=100)
    lids = [f"1795530000.{i}" for i in range(3)]
    with served(a) as steps:  # the calls' steps need no process of their own here
        for lid in lids:  # the portal fails: each call's register and finish wait in the shared outbox
            assert steps.run(["incoming", "89161234567"], linkedid=lid).set_variables["BITRIX_STATUS"] == "QUEUED"
            assert steps.run(["hangup", "NOANSWER", ""], linkedid=lid,
                             dead=True).set_variables["BITRIX_STATUS"] == "QUEUED"
    emulator.clear_faults()
    tried = len(emulator.requests_for("telephony.externalcall.register"))
    stuck = emulator.hold("telephony.externalcall.register", count=1)
    worker = a.background("outbox", "flush")  # A's deliverer
    try:
        wait_for(lambda: len(emulator.requests_for("telephony.externalcall.register")) == tried + 1,
                 "A's deliverer to be stuck in a request")
        os.kill(worker.pid, signal.SIGKILL)  # PBX A dies holding a call's entries
        worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    stuck.set()  # the portal answers the request of a worker that is gone
    leased = pg_rows(a.url, "SELECT count(*) AS n FROM agi_bitrix.outbox WHERE pbx = 'office-a' AND lease_until > %s",
                     time.time())
    assert leased[0]["n"] == 6  # the held batch's three calls, register and finish each, leased by the dead worker
    # The clock moves past the lease (as pbx.advance moves the calls' clock).
    pg_rows(a.url, "UPDATE agi_bitrix.outbox SET lease_until = lease_until - 600 RETURNING id")

    # B's own call happens to have the linkedid of one of A's: every key carries the PBX.
    assert b.run(["incoming", "89161234567"], linkedid=lids[0]).set_variables["BITRIX_STATUS"] == "OK"
    b.run(["answer"], linkedid=lids[0], channel="PJSIP/103-00000002")
    assert b.run(["hangup", "ANSWER", "3"], linkedid=lids[0], dead=True).set_variables["BITRIX_STATUS"] == "OK"

    res = b.admin("outbox", "flush")
    assert res.returncode == 0 and "still waiting 0" in res.stdout, res.stdout + res.stderr
    calls = {c["register"]["EXTERNAL_CALL_ID"]: c for c in emulator.calls.values()}
    assert sorted(calls) == sorted([f"office-a:{lid}" for lid in lids] + [f"office-b:{lids[0]}"])
    assert all(calls[f"office-a:{lid}"]["finished"] and calls[f"office-a:{lid}"]["status_code"] == "304"
               for lid in lids)
    assert calls[f"office-b:{lids[0]}"]["status_code"] == "200"
    assert calls[f"office-b:{lids[0]}"]["finish_user_id"] == emulator.people["103"]
    # Each finish once: the portal did the held batch's; their repeats are answered "not found".
    assert len([r for r in emulator.requests_for("telephony.externalcall.finish") if r["status"] == 200]) == 4
    rows = pg_rows(a.url, "SELECT pbx, answered_inner FROM agi_bitrix.calls WHERE linkedid = %s ORDER BY pbx",
                   lids[0])
    assert [(r["pbx"], r["answered_inner"]) for r in rows] == [("office-a", None), ("office-b", "103")]
    assert '"carried"' in b.log_text() and "office-a" in b.log_text()
    assert pg_rows(a.url, "SELECT count(*) AS n FROM agi_bitrix.outbox WHERE state != 'done'")[0]["n"] == 0


def test_postgresql_stopped_in_the_middle_of_calls_nothing_lost(two_pbxs, emulator, pg_cluster):
    a, _ = two_pbxs
    before = ["1795540000.1", "1795540000.2"]
    for lid in before:  # ringing and answered while PostgreSQL is up
        assert a.run(["incoming", "89161234567"], linkedid=lid).set_variables["BITRIX_STATUS"] == "OK"
        a.run(["answer"], linkedid=lid, channel="PJSIP/102-00000002")
    across = "1795540000.4"  # rings before, answered during, hung up after the outage
    assert a.run(["incoming", "89161234567"], linkedid=across).set_variables["BITRIX_STATUS"] == "OK"
    pg_cluster.stop()
    try:
        a.run(["answer"], linkedid=across, channel="PJSIP/103-00000003")
        during = "1795540000.3"
        runs = [a.run(["hangup", "ANSWER", "4"], linkedid=lid, dead=True) for lid in before]
        runs.append(a.run(["incoming", "89161234567"], linkedid=during))
        emulator.fail_next(500, "INTERNAL_SERVER_ERROR", "boom", method="telephony.externalcall.finish", count=5)
        runs.append(a.run(["hangup", "NOANSWER", ""], linkedid=during, dead=True))
        # The steps answer Asterisk on the local journal: delivered, or kept for later.
        assert statuses(runs) == ["OK", "OK", "OK", "QUEUED"]
        assert all("shared_store_problem" in line for line in a.log()[-4:])
        res = a.admin("outbox", "flush")  # the journal cannot be moved yet: it stays, and says so
        assert res.returncode == 0
    finally:
        pg_cluster.start()
    emulator.clear_faults()
    # Its hangup runs on PostgreSQL before any deliverer moved the journal: the step brings the
    # answer it recorded meanwhile along, so the call ends answered, by the one who answered.
    run = a.run(["hangup", "ANSWER", "5"], linkedid=across, dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "OK" and a.log()[-1]["journal_moved"] == 1
    res = a.admin("outbox", "flush")
    assert res.returncode == 0 and "still waiting 0" in res.stdout, res.stdout + res.stderr
    calls = {c["register"]["EXTERNAL_CALL_ID"]: c for c in emulator.calls.values()}
    assert sorted(calls) == [f"office-a:{lid}" for lid in before + [during, across]]
    assert [calls[f"office-a:{lid}"]["status_code"] for lid in before + [across]] == ["200", "200", "200"]
    assert calls[f"office-a:{across}"]["finish_user_id"] == emulator.people["103"]
    assert calls[f"office-a:{during}"]["finished"] and calls[f"office-a:{during}"]["status_code"] == "304"
    finishes = [r for r in emulator.requests_for("telephony.externalcall.finish") if r["status"] == 200]
    assert len(finishes) == 4 and len(emulator.requests_for("telephony.externalcall.register")) == 4
    rows = pg_rows(a.url, "SELECT linkedid, finished_at, answered_inner FROM agi_bitrix.calls ORDER BY linkedid")
    assert [(r["linkedid"], r["answered_inner"]) for r in rows] == [
        (before[0], "102"), (before[1], "102"), (during, None), (across, "103")]
    assert all(r["finished_at"] for r in rows)  # the shared store learned what happened meanwhile
    assert "waiting: 0" in a.admin("outbox", "status").stdout


def one_line(res) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_bad_shared_store_settings_get_one_line_with_the_fix(two_pbxs, emulator, pg_cluster):
    a, b = two_pbxs
    good = a.url
    a.set("storage", "url", good.replace("pg-test-secret", "wrong"))
    line = one_line(a.cli("migrate"))  # through the entry point; the rest in this process
    assert "refused the password of role postgres: correct the password in [storage] url" in line
    assert "wrong" not in line
    # The call path keeps working on the local journal, and its log line says why.
    assert a.run(["incoming", "89161234567"], linkedid="1795550000.1").set_variables["BITRIX_STATUS"] == "OK"
    assert "refused the password" in a.log()[-1]["shared_store_problem"]

    a.set("storage", "url", good.rsplit("/", 1)[0] + "/nosuchdb")
    assert "has no database nosuchdb: create it (createdb -O postgres nosuchdb)" in one_line(a.admin("migrate"))

    empty = pg_cluster.database()
    if not pg_cluster.sql("SELECT 1 FROM pg_roles WHERE rolname = 'pbx_user'"):  # one cluster, many tests
        pg_cluster.sql("CREATE ROLE pbx_user LOGIN PASSWORD 'pbx-secret'")
    pg_cluster.sql(f"REVOKE CREATE ON DATABASE {empty} FROM PUBLIC")
    a.set("storage", "url", pg_cluster.url(empty, "pbx_user", "pbx-secret"))
    assert "role pbx_user lacks rights" in (line := one_line(a.admin("migrate"))) and \
        f"GRANT CREATE ON DATABASE {empty} TO pbx_user" in line

    a.set("storage", "url", good)
    assert a.admin("migrate").returncode == 0
    pg_rows(good, "INSERT INTO agi_bitrix.schema_version VALUES (99, 0, '9.9') RETURNING version")
    assert "schema is version 99, newer than this agi-bitrix" in one_line(a.admin("migrate"))
    run = a.run(["incoming", "89161234567"], linkedid="1795550000.2")  # the step does not write into it
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert "upgrade agi-bitrix on this PBX" in a.log()[-1]["shared_store_problem"]
    pg_rows(good, "DELETE FROM agi_bitrix.schema_version WHERE version = 99 RETURNING version")

    b.set("storage", "pbx_id", "office-a")  # a second PBX under A's name
    line = one_line(b.admin("migrate"))
    assert f"another PBX ({os.uname().nodename}:{a.state_dir}) uses pbx_id office-a" in line
    assert "give each PBX its own [storage] pbx_id" in line
    assert "uses pbx_id office-a" in one_line(b.admin("outbox", "flush"))  # its deliverer will not run either
    b.set("storage", "pbx_id", "office-b")
    assert b.admin("migrate").returncode == 0
    report = a.admin("check").stdout
    assert "shared store PostgreSQL at 127.0.0.1" in report and "schema version 1, this PBX is office-a" in report
    assert "other PBXs in it: office-b (" in report


def test_a_step_on_sqlite_never_imports_psycopg(pbx, emulator, tmp_path, pg_url):
    env = {"PYTHONPROFILEIMPORTTIME": "1"}  # every import on stderr
    run = pbx.run(["incoming", "89161234567"], linkedid="1795560000.1", env=env)
    assert run.set_variables["BITRIX_STATUS"] == "OK" and "import time:" in run.stderr
    assert "psycopg" not in run.stderr
    shared = SharedPBX(tmp_path / "shared", emulator.webhook_url, pg_url, "office-a")
    run = shared.run(["incoming", "89161234567"], linkedid="1795560000.2", env=env)
    assert run.set_variables["BITRIX_STATUS"] == "OK" and "psycopg" in run.stderr


def test_sqlite_schema_is_versioned(pbx):
    import sqlite3

    db = sqlite3.connect(str(pbx.state_dir / "agi-bitrix.sqlite3"))
    # A database of an early release: its calls and outbox lack the columns added since.
    db.executescript("CREATE TABLE calls (linkedid TEXT PRIMARY KEY, direction TEXT NOT NULL, phone TEXT NOT NULL,"
                     " line TEXT NOT NULL DEFAULT '', user_inner TEXT NOT NULL, call_id TEXT,"
                     " shown TEXT NOT NULL DEFAULT '[]', answered_inner TEXT, answered_at REAL,"
                     " started_at REAL NOT NULL, finished_at REAL, status_code TEXT, duration INTEGER);"
                     "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, linkedid TEXT NOT NULL,"
                     " kind TEXT NOT NULL, payload TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',"
                     " attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL, created_at REAL NOT NULL,"
                     " done_at REAL, last_error TEXT);")
    db.close()
    res = pbx.cli("migrate")  # through the entry point, as an administrator runs it
    assert res.returncode == 0 and "schema version 1" in res.stdout, res.stderr
    assert pbx.run(["incoming", "89161234567"], linkedid="1795560100.1").set_variables["BITRIX_STATUS"] == "OK"
    assert pbx.run(["hangup", "NOANSWER", ""], linkedid="1795560100.1", dead=True).set_variables[
        "BITRIX_STATUS"] == "OK"
    db = sqlite3.connect(str(pbx.state_dir / "agi-bitrix.sqlite3"))
    db.execute("PRAGMA user_version = 7")
    db.close()
    line = one_line(pbx.admin("migrate"))
    assert "has schema version 7, newer than this agi-bitrix (1): upgrade agi-bitrix" in line


@installs
def test_install_migrates_the_shared_store_once(tmp_path, emulator, pg_cluster):
    pbx = SharedPBX(tmp_path, emulator.webhook_url, pg_cluster.url(pg_cluster.database()), "office-a")
    agi_bin = tmp_path / "agi-bin"
    agi_bin.mkdir()
    first = pbx.cli("install", "--agi-bin", str(agi_bin), "--settings", str(pbx.settings_file))
    assert first.returncode == 0, first.stderr
    assert "schema version 1 (new); this PBX is office-a" in first.stdout
    again = pbx.cli("install", "--agi-bin", str(agi_bin), "--settings", str(pbx.settings_file))
    assert again.returncode == 0 and "nothing to change" in again.stdout
    assert pg_rows(pbx.url, "SELECT version FROM agi_bitrix.schema_version") == [{"version": 1}]
    assert pbx.run(["incoming", "89161234567"], linkedid="1795570000.1").set_variables["BITRIX_STATUS"] == "OK"
    assert "shared_store_problem" not in pbx.log()[-1]


def test_a_stuck_database_sends_the_step_to_its_journal(two_pbxs, emulator):
    import psycopg

    a, _ = two_pbxs
    a.set("storage", "db_timeout", "1")
    lid = "1795580000.1"
    assert a.run(["incoming", "89161234567"], linkedid=lid).set_variables["BITRIX_STATUS"] == "OK"
    with psycopg.connect(a.url) as other:  # another session holds the call's row and never lets go
        other.execute("SELECT 1 FROM agi_bitrix.calls WHERE linkedid = %s FOR UPDATE", (lid,))
        run = a.run(["hangup", "NOANSWER", ""], linkedid=lid, dead=True)
        other.rollback()
    assert run.set_variables["BITRIX_STATUS"] == "OK"  # delivered from the journal meanwhile
    assert "a query outlived [storage] db_timeout" in a.log()[-1]["shared_store_problem"]
    res = a.admin("outbox", "flush")
    assert res.returncode == 0 and "still waiting 0" in res.stdout
    assert only_finished_once(emulator, f"office-a:{lid}")
    rows = pg_rows(a.url, "SELECT finish_claimed, finished_at, status_code FROM agi_bitrix.calls")
    assert rows[0]["finished_at"] and rows[0]["status_code"] == "304"


def only_finished_once(emulator, external_id: str) -> bool:
    calls = [c for c in emulator.calls.values() if c["register"]["EXTERNAL_CALL_ID"] == external_id]
    finishes = [r for r in emulator.requests_for("telephony.externalcall.finish") if r["status"] == 200]
    return len(calls) == 1 and calls[0]["finished"] and len(finishes) == 1
