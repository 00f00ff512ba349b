"""Several PBXs on one PostgreSQL, past the happy path: PostgreSQL restarted under long-lived
processes, a PBX that is gone, click-to-call and the caches on the shared store, a token pair the
store missed, the request budget while the store is away."""
from __future__ import annotations

import pytest

from conftest import SharedPBX, SharedServicePBX, only_call, pg_rows
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
    """Its pooled connections of the call steps, and its dialer's, are opened anew; a dialer that
    started while PostgreSQL was away begins once it is back."""
    from test_dialer import CallCenter

    a = SharedServicePBX(tmp_path, emulator.webhook_url, pg_url, "office-a")
    with FakeAMI(username="crm", secret="ami-1") as ami:
        center = CallCenter(a, emulator, ami)
        a.values["dialer"]["poll_interval"] = "1"
        a.values["service"]["dialer"] = "yes"
        a.write()
        center.script["+7916"] = OriginateOutcome(reason=5)
        first = center.task("Позвонить: Иван Петров", ["+7 916 111-22-33"], responsible=center.anna)
        pg_cluster.stop()
        try:
            try:
                a.start()
                wait_for(lambda: any(line["event"] == "dialer_pass" and "cannot be reached" in line.get("reason", "")
                                     for line in a.log()), "the dialer to find PostgreSQL away")
            finally:
                pg_cluster.start()
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


def test_the_calls_a_gone_pbx_left_open_are_closed_by_another_once(two_pbxs, emulator):
    a, b = two_pbxs
    b.set("calls", "max_call_length", "3600")  # A keeps the default, 4 hours
    lid = "1795610000.1"
    assert a.run(CALL, linkedid=lid).set_variables["BITRIX_STATUS"] == "OK"  # its hangup never runs
    assert a.admin("outbox", "flush").returncode == 0  # A's deliverer: A is alive
    a.advance(5 * 3600)  # the call began 5 hours ago
    assert b.admin("outbox", "flush").returncode == 0
    assert not emulator.requests_for("telephony.externalcall.finish")  # a live PBX closes its own calls
    pg_rows(a.url, "UPDATE agi_bitrix.pbxs SET seen_at = seen_at - 301 WHERE pbx = 'office-a' RETURNING pbx")
    res = b.admin("outbox", "flush")  # A has been silent 5 minutes: it is gone
    assert res.returncode == 0 and "delivered 1, still waiting 0" in res.stdout, res.stdout + res.stderr
    closed = [line for line in b.log() if line["event"] == "call_closed_unfinished"]
    assert [(c["pbx"], c["linkedid"], c["status_code"]) for c in closed] == [("office-a", lid, "304")]
    call = only_call(emulator)
    assert call["register"]["EXTERNAL_CALL_ID"] == f"office-a:{lid}" and call["finished"]
    assert call["status_code"] == "304"
    # Neither B again, nor A coming back (past its own max_call_length now), closes it twice.
    assert b.admin("outbox", "flush").returncode == 0
    a.advance(3600)
    assert a.admin("outbox", "flush").returncode == 0
    assert len(emulator.requests_for("telephony.externalcall.finish")) == 1
    assert not [line for line in a.log() if line["event"] == "call_closed_unfinished"]



@pytest.mark.parametrize("server", ["serve", "service"])
def test_click_to_call_on_the_shared_store(server, tmp_path, emulator, pg_url):
    """The event handler of `agi-bitrix serve`, or the one inside `agi-bitrix service`."""
    from test_click2call import Desk

    kind = SharedPBX if server == "serve" else SharedServicePBX
    a = kind(tmp_path / "a", emulator.webhook_url, pg_url, "office-a")
    with FakeAMI(username="crm", secret="ami-2") as ami:
        desk = Desk(a, emulator, ami, "online")
        try:
            if server == "serve":
                desk.serve()  # the installation callback stores the token pair in the shared store
            else:
                a.start()
                desk.port = a.service.web.server_address[1]
                a.set("events", "handler_url", f"http://127.0.0.1:{desk.port}/")
                assert emulator.install_app(f"http://127.0.0.1:{desk.port}/") == 200
            data = emulator.click_to_call(emulator.people["101"], "8 (916) 765-43-21")
            call = desk.finished(data["CALL_ID"])
        finally:
            desk.stop()
            if server == "service":
                a.stop()
    assert call["status_code"] == "200" and call["finish_user_id"] == emulator.people["101"]
    assert emulator.requests_for("telephony.externalcall.register") == []
    rows = pg_rows(pg_url, "SELECT pbx, call_id, finished_at FROM agi_bitrix.calls")
    assert [(r["pbx"], r["call_id"]) for r in rows] == [("office-a", data["CALL_ID"])] and rows[0]["finished_at"]
    assert len(pg_rows(pg_url, "SELECT portal FROM agi_bitrix.tokens")) == 1
    assert "shared_store_problem" not in a.log_text()
    # PBX B has a handler bound too: the portal posts it the same event, and B rings nobody.
    b = SharedPBX(tmp_path / "b", emulator.webhook_url, pg_url, "office-b")
    b.set("events", "click_dedup", "60")  # A's window: wider than the call above takes on a loaded machine
    assert handled_by(b, data) == "repeat of an event already handled"
    # The employee clicks the same number again at once, and B takes that event: a double click.
    again = emulator.click_to_call(emulator.people["101"], "8 (916) 765-43-21")
    assert handled_by(b, again) == "not dialed: a repeated click on the same number"
    assert emulator.calls[again["CALL_ID"]]["status_code"] == "603-S"
    assert len(ami.originates) == 1


def handled_by(pbx, data) -> str:
    """What PBX `pbx`'s event handler makes of a click-to-call event (in this process)."""
    from agi_bitrix import settings as settings_mod
    from agi_bitrix.bitrix.factory import make_client
    from agi_bitrix.events import CLICK, EventProcessor
    from agi_bitrix.stores import open_store

    settings = settings_mod.load(str(pbx.settings_file))
    store = open_store(settings)
    try:
        def no_ringing():
            raise AssertionError(f"{pbx.pbx_id} rang the employee")

        return EventProcessor(settings, store, make_client(settings), no_ringing, {}).handle(CLICK, data)
    finally:
        store.close()


@pytest.mark.parametrize("window", ["60", "0"])
def test_a_callback_form_event_both_pbxs_take_at_once_rings_the_visitor_once(window, two_pbxs, emulator):
    """Both PBXs' handlers are bound: the portal posts each the same event (one `ts`), and both
    handle it at the same moment. One registers and rings; the other answers "repeat". With no
    repeat window ([events] click_dedup = 0) the event's own identity still holds."""
    import threading

    from test_click2call import callback_form, callback_handler

    data = callback_form("+7 903 555-12-14")
    with FakeAMI(username="crm", secret="ami-a") as ami_a, FakeAMI(username="crm", secret="ami-b") as ami_b:
        handlers = [callback_handler(pbx, ami, window) for pbx, ami in zip(two_pbxs, (ami_a, ami_b))]
        together = threading.Barrier(2)
        outcomes = []

        def take(handle) -> None:
            together.wait()
            outcomes.append(handle(data, "ts-1795650000"))

        threads = [threading.Thread(target=take, args=(h,)) for h in handlers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # The same event again, later, to either PBX: still the one request.
        assert [h(data, "ts-1795650000") for h in handlers] == ["repeat of a callback request"] * 2
    assert sorted(outcomes) == ["repeat of a callback request", "ringing PJSIP/101"]
    assert len(ami_a.originates) + len(ami_b.originates) == 1
    registers = emulator.requests_for("telephony.externalcall.register")
    assert [r["params"]["PHONE_NUMBER"] for r in registers] == ["+79035551214"]
    rows = pg_rows(two_pbxs[0].url, "SELECT pbx FROM agi_bitrix.calls")
    assert len(rows) == 1


def test_a_double_click_taken_by_both_pbxs_at_once_rings_the_employee_once(two_pbxs, emulator, monkeypatch):
    """The employee's two clicks on one number, one event taken by each PBX at the same moment, each
    past its claim before the other looks: one PBX rings, the other's is the repeated click."""
    from agi_bitrix.shared.store import PgStore
    from test_click2call import callback_handler, clicks_taken_at_once

    clicks = [emulator.click_to_call(emulator.people["101"], "8 (916) 765-43-40") for _ in range(2)]
    with FakeAMI(username="crm", secret="ami-a") as ami_a, FakeAMI(username="crm", secret="ami-b") as ami_b:
        handlers = [callback_handler(pbx, ami, "60", "ONEXTERNALCALLSTART")
                    for pbx, ami in zip(two_pbxs, (ami_a, ami_b))]
        outcomes = clicks_taken_at_once(monkeypatch, PgStore, handlers, clicks)
    assert sorted(outcomes) == ["not dialed: a repeated click on the same number", "ringing PJSIP/101"]
    assert len(ami_a.originates) + len(ami_b.originates) == 1


def test_a_route_one_pbx_looked_up_serves_the_other(two_pbxs, emulator):
    a, b = two_pbxs
    for pbx in two_pbxs:
        pbx.set("calls", "route_to_responsible", "yes")
    run = a.run(["incoming", "+79161234567"], linkedid="1795620000.1")
    assert run.set_variables["BITRIX_RESPONSIBLE"] == "102"  # Ivan Sidorov's manager
    searches = len(emulator.requests_for("telephony.externalcall.searchcrmentities"))
    assert searches == 1
    rows = pg_rows(a.url, "SELECT phone, inner_number FROM agi_bitrix.routes")
    assert [(r["phone"], r["inner_number"]) for r in rows] == [("+79161234567", "102")]
    run = b.run(["incoming", "+79161234567"], linkedid="1795620000.1")
    assert run.set_variables["BITRIX_RESPONSIBLE"] == "102" and b.log()[-1]["route"] == "cached"
    assert len(emulator.requests_for("telephony.externalcall.searchcrmentities")) == searches
    # Past [calls] route_cache the next lookup asks the portal again, and a number without a
    # manager is remembered as such.
    pg_rows(a.url, "UPDATE agi_bitrix.routes SET fetched_at = fetched_at - 301 RETURNING phone")
    b.run(["incoming", "+79161234567"], linkedid="1795620000.2")
    assert len(emulator.requests_for("telephony.externalcall.searchcrmentities")) == searches + 1
    assert "route" not in b.log()[-1]
    a.run(["incoming", "+74950000000"], linkedid="1795620000.3")
    run = b.run(["incoming", "+74950000000"], linkedid="1795620000.3")
    assert run.set_variables["BITRIX_RESPONSIBLE"] == "" and b.log()[-1]["route"] == "cached"
    assert len(emulator.requests_for("telephony.externalcall.searchcrmentities")) == searches + 2



def test_a_renewed_pair_the_shared_store_missed_reaches_it_from_this_pbxs_copy(tmp_path, emulator, pg_url,
                                                                                pg_cluster):
    """PostgreSQL goes away while the OAuth server renews the pair for PBX A's service: the pair
    lands in A's oauth-tokens.json only. When PostgreSQL is back, A's deliverer hands that pair
    over (A's steps need nothing from the store meanwhile); B uses it, never the spent one."""
    import json

    from test_oauth import use_oauth

    a = SharedServicePBX(tmp_path / "a", emulator.webhook_url, pg_url, "office-a")
    b = SharedPBX(tmp_path / "b", emulator.webhook_url, pg_url, "office-b")
    for pbx in (a, b):
        use_oauth(pbx, emulator)
    a.values["service"]["flush_interval"] = "0.2"
    assert b.cli("auth", "--code", stdin=emulator.authorization_code() + "\n").returncode == 0
    unshared = a.state_dir / "oauth-tokens.unshared"
    a.start()
    try:
        emulator.expire_access_tokens()
        emulator.on_request("oauth.token", pg_cluster.stop)  # the refresh is on its way: PostgreSQL stops
        try:
            a.run(CALL, linkedid="1795630000.1")
            missed = unshared.exists()
        finally:
            emulator.on_request("oauth.token", None)
            pg_cluster.start()
        assert missed and emulator.refresh_count == 1
        wait_for(lambda: not unshared.exists(), "A's deliverer to hand the pair over", 60)
        kept = json.loads((a.state_dir / "oauth-tokens.json").read_text())
        shared = json.loads(pg_rows(pg_url, "SELECT pair FROM agi_bitrix.tokens")[0]["pair"])
        assert shared["refresh_token"] == kept["refresh_token"]
        runs = [b.run(CALL, linkedid=f"1795630000.{n}") for n in (2, 3)]
        assert [r.set_variables["BITRIX_STATUS"] for r in runs] == ["OK", "OK"]
        assert emulator.refresh_count == 1 and emulator.spent_refresh_uses == 0
    finally:
        a.stop()


def test_a_refused_pair_never_replaces_one_handed_over_meanwhile(tmp_path, pg_url):
    """B refreshes with the stored (spent) pair while A hands over the pair it renewed: B's mark of
    refusal lands only on the pair it was refused for."""
    import time
    from dataclasses import replace

    from agi_bitrix.bitrix.oauth import Tokens
    from agi_bitrix.shared.tokens import SharedTokenStore

    stores = {}
    for name in "ab":
        (tmp_path / name).mkdir()
        stores[name] = SharedTokenStore(str(tmp_path / name), pg_url, f"office-{name}", "portal.example", 5.0)
    spent = Tokens("access-1", "refresh-1", time.time() + 3600, "https://portal.example/rest/")
    stores["b"].save(spent)
    stores["a"]._put(replace(spent, access_token="access-2", refresh_token="refresh-2"))  # the hand-over
    stores["b"].save(replace(spent, refused="invalid_grant"))  # B's refresh with refresh-1 was refused
    assert stores["b"].load().refresh_token == "refresh-2"
    assert not stores["b"].load().refused


def test_while_postgresql_is_away_the_pbxs_together_stay_inside_the_portals_budget(tmp_path, emulator, pg_url,
                                                                                    pg_cluster):
    """The portal's bucket (20, draining 20 a second) is full when PostgreSQL stops. Each of the
    two PBXs falls back on its share (10 at 10 a second), starting full: together they send no
    faster than the portal drains, and draw no 503."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlsplit

    from agi_bitrix.bitrix.ratelimit import RateLimiter

    emulator.set_bucket(20, 20.0)
    pbxs = [SharedServicePBX(tmp_path / name, emulator.webhook_url, pg_url, f"office-{name}") for name in "ab"]
    for pbx in pbxs:
        pbx.set("bitrix24", "rate_burst", "20")  # the portal's budget: on the shared store, for all PBXs
        pbx.set("bitrix24", "rate_per_second", "20")
    assert pbxs[1].admin("outbox", "flush").returncode == 0  # B is alive before A's deliverer looks
    files = [RateLimiter(str(pbx.state_dir), urlsplit(emulator.webhook_url).netloc).path for pbx in pbxs]
    try:
        for pbx, file in zip(pbxs, files):
            pbx.start()  # its deliverer's first pass sees two PBXs alive
            wait_for(lambda f=file: f.exists() and '"pbxs": 2' in f.read_text(), "the deliverer to count two PBXs")
        pg_cluster.stop()
        try:
            emulator.fill_bucket()
            work = [(pbx, f"17956400{n}.{i}") for n, pbx in enumerate(pbxs) for i in range(12)]
            with ThreadPoolExecutor(len(work)) as pool:
                runs = list(pool.map(lambda job: job[0].run(CALL, linkedid=job[1]), work))
        finally:
            pg_cluster.start()
    finally:
        for pbx in pbxs:
            pbx.stop()
    assert [r.set_variables["BITRIX_STATUS"] for r in runs] == ["OK"] * 24
    registers = emulator.requests_for("telephony.externalcall.register")
    assert len(registers) == 24 and [r["status"] for r in registers].count(503) == 0
    assert all("shared_store_problem" in line for pbx in pbxs for line in pbx.log() if line["event"] == "incoming")


class SilentServer:
    """A PostgreSQL host that takes connections and never answers: each costs libpq its
    connect timeout. Counts the connections made to it."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def url(self) -> str:
        return "postgresql://postgres:secret@127.0.0.1:%d/agi" % self.sock.getsockname()[1]

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def test_a_postgresql_that_does_not_answer_costs_a_step_one_connect_timeout(tmp_path, emulator, pg_url):
    """The step's first attempt (reading the token pair) ends its use of PostgreSQL: neither the
    store nor the request budget tries again (each attempt costs libpq's connect timeout, 2 s at
    least)."""
    from test_oauth import use_oauth

    a = SharedPBX(tmp_path, emulator.webhook_url, pg_url, "office-a")
    use_oauth(a, emulator)  # the pair is in the shared store, and in this PBX's copy
    assert a.cli("auth", "--code", stdin=emulator.authorization_code() + "\n").returncode == 0
    silent = SilentServer()
    try:
        a.values["storage"].update(url=silent.url(), db_timeout="1")  # libpq waits 2 s for a connection
        a.write()
        run = a.run(CALL, linkedid="1795650000.1")
    finally:
        silent.close()
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert "cannot be reached (no answer)" in a.log()[-1]["shared_store_problem"]
    assert len(silent.accepted) == 1
