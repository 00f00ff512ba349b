"""Several PBXs on one PostgreSQL, past the happy path: PostgreSQL restarted under long-lived
processes, a PBX that is gone, click-to-call and the caches on the shared store, a token pair the
store missed, the request budget while the store is away."""
from __future__ import annotations

from conftest import SharedPBX, SharedServicePBX, pg_rows
from test_shared_store import CALL, wait_for

from agi_bitrix.testing.fake_ami import FakeAMI, OriginateOutcome


def attempts(url: str, task_id: int) -> int:
    rows = pg_rows(url, "SELECT attempts FROM agi_bitrix.dialer_tasks WHERE task_id = %s", task_id)
    return rows[0]["attempts"] if rows else 0


def test_dialer_run_goes_on_after_postgresql_restarts(tmp_path, emulator, pg_url, pg_cluster):
    from test_dialer import CallCenter

    a = SharedPBX(tmp_path, emulator.webhook_url, pg_url, "office-a")
    with FakeAMI(username="crm", secret="ami-1") as ami:
        center = CallCenter(a, emulator, ami)
        a.values["dialer"]["poll_interval"] = "1"
        a.write()
        center.script["+7916"] = OriginateOutcome(reason=5)  # busy: each attempt ends at once
        first = center.task("Позвонить: Иван Петров", ["+7 916 111-22-33"], responsible=center.anna)
        dialer = a.background("dialer", "run")
        try:
            wait_for(lambda: attempts(pg_url, first) == 1, "the first pass to dial the first task")
            pg_cluster.stop()  # the dialer's connection is cut under it
            pg_cluster.start()
            second = center.task("Позвонить: Пётр Иванов", ["+7 916 222-33-44"], responsible=center.boris)
            wait_for(lambda: attempts(pg_url, second) == 1, "a pass after the restart to dial the second task", 60)
            assert dialer.poll() is None  # still running
        finally:
            dialer.terminate()
            dialer.wait(timeout=60)
    dialed = [o.get("ChannelId") for o in ami.originates]
    assert [sum(1 for d in dialed if d.startswith(f"dialer-{t}-")) for t in (first, second)] == [1, 1]


def test_the_service_goes_back_to_postgresql_after_it_restarts(tmp_path, emulator, pg_url, pg_cluster):
    """Its pooled connections of the call steps, and its dialer's, are opened anew."""
    from test_dialer import CallCenter

    a = SharedServicePBX(tmp_path, emulator.webhook_url, pg_url, "office-a")
    with FakeAMI(username="crm", secret="ami-1") as ami:
        center = CallCenter(a, emulator, ami)
        a.values["dialer"]["poll_interval"] = "1"
        a.values["service"]["dialer"] = "yes"
        a.write()
        center.script["+7916"] = OriginateOutcome(reason=5)
        first = center.task("Позвонить: Иван Петров", ["+7 916 111-22-33"], responsible=center.anna)
        a.start()
        try:
            wait_for(lambda: attempts(pg_url, first) == 1, "the service's dialer to dial the first task")
            lids = ["1795600000.1", "1795600000.2"]
            assert a.run(CALL, linkedid=lids[0]).set_variables["BITRIX_STATUS"] == "OK"
            pg_cluster.stop()
            pg_cluster.start()
            second = center.task("Позвонить: Пётр Иванов", ["+7 916 222-33-44"], responsible=center.boris)
            assert a.run(CALL, linkedid=lids[1]).set_variables["BITRIX_STATUS"] == "OK"
            line = a.log()[-1]
            assert line["linkedid"] == lids[1] and "shared_store_problem" not in line, line
            wait_for(lambda: attempts(pg_url, second) == 1, "the service's dialer to dial the second task", 60)
        finally:
            a.stop()
    rows = pg_rows(pg_url, "SELECT linkedid, call_id FROM agi_bitrix.calls WHERE linkedid = ANY(%s) ORDER BY linkedid",
                   lids)
    assert [r["linkedid"] for r in rows if r["call_id"]] == lids
