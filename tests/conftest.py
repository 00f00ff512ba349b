"""Shared fixtures: the Bitrix24 emulator and a PBX that runs the installed `agi-bitrix` under the fake Asterisk."""
from __future__ import annotations

import copy
import json
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from agi_bitrix.testing.fake_asterisk import AGIRun, FakeAsterisk
from agi_bitrix.testing.fake_fastagi import FakeFastAGI

ENTRY = Path(sys.executable).with_name("agi-bitrix")
WEBHOOK_CODE = "s3cr3t-webhook-code"
# A call step's budget ([bitrix24] timeout) in tests: a loaded CI machine may need seconds just to
# start a process, and a step past its budget ends QUEUED. Tests of the budget set their own.
STEP_BUDGET = "30"
# The budget of tests that show a step let go at its budget while the portal holds the request
# (emulator.hold): long enough for a loaded machine to start the process and send the request.
# A step served by the service in the test's process starts no process: `pbx.short_budget`.
SHORT_BUDGET = "6"
HELD = 60.0  # a step that waited this long was held by the portal, not let go at its budget


# The test modules' asserts are rewritten by pytest, and the result cached beside them unless
# PYTHONDONTWRITEBYTECODE is set: then each xdist worker rewrites every module again (a second and
# a half of CPU each). The flag holds for this process only; the processes the tests start keep it.
sys.dont_write_bytecode = False


def pytest_configure(config) -> None:
    """The package compiled once, before the workers start, as an installed package runs: every
    `agi-bitrix` process the tests start would otherwise compile each module it imports again when
    PYTHONDONTWRITEBYTECODE is set (two thirds more CPU for a step). Stale files only; a module
    edited since is compiled again here."""
    import compileall

    import agi_bitrix

    if hasattr(config, "workerinput"):
        return
    compileall.compile_dir(str(Path(agi_bitrix.__file__).parent), quiet=1)
    if config.getoption("numprocesses", None):
        # The test modules imported once here, so pytest's assert rewriting is cached before the
        # workers start (each would rewrite them all again: a second and a half of CPU each). A
        # module that fails to import is left to the workers, which report it as a test does.
        import importlib

        for module in sorted(Path(__file__).parent.glob("test_*.py")):
            try:
                importlib.import_module(module.stem)
            except Exception:
                pass


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml) starts three workers a core: many tests spend their time waiting
    (a step's budget, a request the portal holds, the browser), and a waiting worker leaves its core
    to the others."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return 3 * cores


@pytest.fixture
def keep_install_record():
    """`install --settings` records its path in this virtualenv, one file for every xdist worker:
    the tests that install hold a lock on it one at a time, and put back what was there before."""
    import fcntl

    from agi_bitrix.settings import record_file

    record = record_file()
    record.parent.mkdir(parents=True, exist_ok=True)
    with open(record.parent / ".tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = record.read_bytes() if record.exists() else None
        try:
            yield
        finally:
            if before is None:
                record.unlink(missing_ok=True)
            else:
                record.write_bytes(before)


installs = pytest.mark.usefixtures("keep_install_record")  # for a test that runs `install`


@pytest.fixture(autouse=True)
def english_locale(monkeypatch):
    """Admin texts follow the locale: the tests read English unless a test asks for Russian."""
    monkeypatch.setenv("LANG", "C.UTF-8")
    for name in ("LC_ALL", "LC_MESSAGES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fast_dir():
    """A folder on tmpfs when there is one, for a database written thousands of times in a test
    (each write's fsync is not what such a test is about)."""
    import shutil
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix="agi-bitrix-test-", dir=base)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def emulator():
    with Bitrix24Emulator(webhook_code=WEBHOOK_CODE) as emu:
        emu.people = {}
        for inner, name in (("101", "Anna"), ("102", "Boris"), ("103", "Vera")):
            emu.people[inner] = int(emu.add_user(name, "Test", inner=inner)["ID"])
        emu.add_contact("Ivan Sidorov", ["+79161234567"], assigned_by_id=emu.people["102"])
        yield emu


class PBX:
    """An Asterisk box in a temp folder: settings, state, log; `run` is one AGI call step."""

    def __init__(self, root: Path, webhook_url: str) -> None:
        assert ENTRY.exists(), f"agi-bitrix is not installed next to {sys.executable}"
        self.root = root
        self.settings_file = root / "settings.ini"
        self.state_dir = root / "state"
        self.log_file = root / "log" / "agi-bitrix.log"
        self.prefix: List[str] = []  # e.g. setpriv ...: run steps and commands as another user
        for folder in (self.state_dir, self.log_file.parent):  # as `agi-bitrix install` leaves them
            folder.mkdir(parents=True, exist_ok=True)
        self.values: Dict[str, Dict[str, str]] = {
            "bitrix24": {"webhook_url": webhook_url, "timeout": STEP_BUDGET},
            # route_timeout: the manager lookup's own budget; tests of that budget set their own.
            "calls": {"default_user": "101", "crm_create": "yes", "anonymous_number": "0000",
                      "route_timeout": "10"},
            "storage": {"state_dir": str(self.state_dir)},
            "logging": {"file": str(self.log_file), "level": "INFO"},
            "asterisk": {"dial_template": "PJSIP/{number}@provider", "dial_timeout": "45"},
        }
        self.write()

    def set(self, section: str, key: str, value: str) -> None:
        self.values.setdefault(section, {})[key] = value
        self.write()

    def write(self) -> None:
        text = "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
                       for s, keys in self.values.items())
        self.settings_file.write_text(text, encoding="utf-8")

    def run(self, args: List[str], wait_delivery: bool = True, **kw: Any) -> AGIRun:
        """One AGI step. `answer` and `dialer-connected` deliver after they returned (a child
        process, or the service's thread, writes the log line when done): unless `wait_delivery`
        is False, wait for it."""
        before = len(self.log())
        run = self.step(args, **kw)
        if wait_delivery and args and args[0] in ("answer", "dialer-connected"):
            self.wait_for(lambda: len(self.log()) > before, "the answer step's delivery")
        return run

    def step(self, args: List[str], **kw: Any) -> AGIRun:
        return self.run_process(args, **kw)

    def run_process(self, args: List[str], **kw: Any) -> AGIRun:
        """The step as its own process, AGI(agi-bitrix,...)."""
        env = {"AGI_BITRIX_SETTINGS": str(self.settings_file)}
        env.update(kw.pop("env", {}) or {})
        kw.setdefault("timeout", 120)  # the fake's own guard: far beyond any budget, on any machine
        return FakeAsterisk(self.prefix + [str(ENTRY)], args, env=env, **kw).run()

    def wait_for(self, condition: Any, what: str, limit: float = 120.0) -> None:
        """Poll until `condition()` holds (bounded; no assertion on how long it took)."""
        end = time.monotonic() + limit
        while not condition():
            assert time.monotonic() < end, f"gave up waiting for {what}"
            time.sleep(0.02)

    def advance(self, seconds: float) -> None:
        """The clock moves on: every recorded answer (and start) happened `seconds` earlier."""
        db = sqlite3.connect(str(self.state_dir / "agi-bitrix.sqlite3"))
        with db:
            db.execute("UPDATE calls SET answered_at = answered_at - ?, started_at = started_at - ?",
                       (seconds, seconds))
        db.close()

    def cli(self, *args: str, timeout: float = 120, stdin: str | None = None,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """An admin command through the installed entry point, with this PBX's settings (and `env`);
        `stdin` is piped to it (secrets go there, never on the command line)."""
        env = dict(os.environ, AGI_BITRIX_SETTINGS=str(self.settings_file), **(env or {}))
        env.pop("AST_AGI_DIR", None)
        if stdin is None:
            return subprocess.run([*self.prefix, str(ENTRY), *args], capture_output=True, text=True, env=env,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
        return subprocess.run([*self.prefix, str(ENTRY), *args], capture_output=True, text=True, env=env,
                              input=stdin, timeout=timeout)

    def admin(self, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """An admin command run in this process, as `cli` runs it through the entry point (the same
        arguments, settings, stdout, stderr and exit code) without the process start: for the many
        tests of what a command says; `cli` stays for what only a process shows (users, signals)."""
        import io
        from contextlib import redirect_stderr, redirect_stdout

        from agi_bitrix.commands import admin

        assert not self.prefix, "a command as another user needs its own process: use cli"
        changes: Dict[str, Optional[str]] = {"AGI_BITRIX_SETTINGS": str(self.settings_file), "AST_AGI_DIR": None,
                                             **(env or {})}
        saved = {name: os.environ.get(name) for name in changes}
        put_env(changes)
        out, err = io.StringIO(), io.StringIO()
        try:
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    code = admin.main(list(args))
                except SystemExit as exc:  # argparse: --help, usage errors
                    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:
            put_env(saved)  # only what it changed: the service's threads may be reading the rest
        return subprocess.CompletedProcess([str(ENTRY), *args], code, out.getvalue(), err.getvalue())

    def background(self, *args: str) -> subprocess.Popen:
        """A long-running admin command (the worker, serve) through the installed entry point."""
        env = dict(os.environ, AGI_BITRIX_SETTINGS=str(self.settings_file))
        env.pop("AST_AGI_DIR", None)
        return subprocess.Popen([*self.prefix, str(ENTRY), *args], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def log(self) -> List[Dict[str, Any]]:
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text(encoding="utf-8").splitlines() if line]

    def log_text(self) -> str:
        return self.log_file.read_text(encoding="utf-8") if self.log_file.exists() else ""


class ServicePBX(PBX):
    """The same PBX with its call steps served by `agi-bitrix service` over FastAGI.

    The service runs in this process (its threads), on free ports; `set` reloads it as
    `systemctl reload` would. Its deliverer makes one pass at start, then waits an hour, so the
    log holds only what the steps wrote.
    """

    transport = "fastagi"

    def __init__(self, root: Path, webhook_url: str, env_timeout: float = 5.0) -> None:
        self.service: Any = None
        self.env_timeout = env_timeout
        super().__init__(root, webhook_url)
        self.values["service"] = {"flush_interval": "3600"}
        self.write()

    def start(self) -> "ServicePBX":
        from agi_bitrix.service.core import Service

        self.set("service", "fastagi", f"127.0.0.1:{free_port()}")
        self.set("events", "listen", f"127.0.0.1:{free_port()}")
        self.service = Service(str(self.settings_file), env_timeout=self.env_timeout)
        self.service.poll = 0.02  # a test's service stops at once, not within half a second
        self.service.start()
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def write(self) -> None:
        super().write()
        if self.service is not None:
            assert self.service.reload(), "the service refused the new settings"

    @property
    def address(self) -> Any:
        return self.service.fastagi.address

    def step(self, args: List[str], **kw: Any) -> AGIRun:
        assert not kw.pop("env", None), "a FastAGI step has no process environment"
        kw.setdefault("timeout", 120)  # the fake's own guard, as for a process: far beyond any budget
        host, port = self.address
        return FakeFastAGI(host, port, args[0] if args else "", args[1:], **kw).run()


PBX.transport = "process"
PBX.short_budget = SHORT_BUDGET
ServicePBX.short_budget = "2"


@contextmanager
def served(pbx: PBX) -> Iterator[ServicePBX]:
    """The call steps of this PBX (its settings, state and log) served in this process by the
    service: for steps a test needs done but is not about, each of which would cost a process
    start (a quarter second of CPU). Afterwards the settings are the PBX's own again."""
    service = ServicePBX(pbx.root, "")
    service.values = {**copy.deepcopy(pbx.values), "service": {"flush_interval": "3600"}}
    service.start()
    try:
        yield service
    finally:
        service.stop()
        pbx.write()


def put_env(values: Dict[str, Optional[str]]) -> None:
    """Set these variables of this process's environment; None removes one."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def free_port() -> int:
    """A port nobody listens on now (for a service started next)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def pbx(tmp_path, emulator) -> PBX:
    return PBX(tmp_path, emulator.webhook_url)


@pytest.fixture
def service_pbx(tmp_path, emulator):
    """A PBX whose call steps `agi-bitrix service` serves in this process (FastAGI, as the sample
    dialplan runs them first); its commands still run through the installed entry point."""
    service = ServicePBX(tmp_path, emulator.webhook_url).start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(params=["process", "fastagi"])
def any_pbx(request, tmp_path, emulator):
    """A PBX whose call steps run in process mode, then the same through `agi-bitrix service`."""
    if request.param == "process":
        return PBX(tmp_path, emulator.webhook_url)
    return request.getfixturevalue("service_pbx")


def webhook_call(emu: Bitrix24Emulator, method: str, params: Any = None, *, form: bool = False):
    """One REST request to the emulator over its webhook, JSON or form-encoded."""
    import requests

    url = emu.webhook_url + method
    if form:
        return requests.post(url, data=params or {}, timeout=30)
    return requests.post(url, json=params if params is not None else {}, timeout=30)


def only_call(emulator: Bitrix24Emulator) -> Dict[str, Any]:
    calls = list(emulator.calls.values())
    assert len(calls) == 1, f"expected one call in Bitrix24, found {len(calls)}"
    return calls[0]


# -- the shared store (PostgreSQL) ------------------------------------------------------------------
PG_TEMPLATE = "pg-template-path"  # where the initdb'd folder is, in the run's own temp folder


def run_folder(config) -> Path:
    """This run's temp folder, shared by its xdist workers (each works in a folder of its own in it)."""
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


@pytest.fixture(scope="session")
def pg_cluster(request):
    """One throwaway PostgreSQL per test worker, stopped at the end. initdb runs once for the
    whole run (a second of CPU); each worker copies its data folder."""
    import fcntl

    from agi_bitrix.testing.postgres import Cluster

    shared = run_folder(request.config)
    with open(shared / "pg-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = shared / PG_TEMPLATE
        if not record.exists():
            record.write_text(str(Cluster.template()))
        template = Path(record.read_text())
    with Cluster(template=template) as cluster:
        yield cluster


def pytest_sessionfinish(session) -> None:
    """The controller (or a run without workers) removes the initdb'd folder once every worker is done."""
    import shutil

    if hasattr(session.config, "workerinput"):
        return
    record = run_folder(session.config) / PG_TEMPLATE
    if record.exists():
        shutil.rmtree(Path(record.read_text()).parent, ignore_errors=True)
        record.unlink()


@pytest.fixture(scope="session")
def pg_template(pg_cluster):
    """A database migrated once; each test gets a copy (CREATE DATABASE ... TEMPLATE)."""
    from agi_bitrix.shared import schema
    from agi_bitrix.shared.connect import connect

    name = pg_cluster.database()
    conn = connect(pg_cluster.url(name), "template", 30)
    try:
        schema.migrate(conn, pg_cluster.url(name))
    finally:
        conn.close()
    return name


@pytest.fixture
def pg_url(pg_cluster, pg_template):
    """A migrated database of its own for this test."""
    return pg_cluster.url(pg_cluster.database(pg_template))


class SharedPBX(PBX):
    """A PBX on the shared store: its own settings and state folder, `pbx_id` in the shared database."""

    def __init__(self, root: Path, webhook_url: str, url: str, pbx_id: str) -> None:
        super().__init__(root, webhook_url)
        self.url, self.pbx_id = url, pbx_id
        # db_timeout: what a step gives PostgreSQL before its local journal; a loaded CI machine
        # may need seconds (tests of a stopped PostgreSQL get refused connections at once).
        self.values["storage"].update(url=url, pbx_id=pbx_id, db_timeout="10")
        self.write()

    def advance(self, seconds: float) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("UPDATE agi_bitrix.calls SET answered_at = answered_at - %s, started_at = started_at - %s"
                         " WHERE pbx = %s", (seconds, seconds, self.pbx_id))
        super().advance(seconds)  # the local journal's copy too


@pytest.fixture
def two_pbxs(tmp_path, emulator, pg_url):
    """Two PBXs of one portal: two settings files and state folders, one PostgreSQL, one emulator."""
    return (SharedPBX(tmp_path / "a", emulator.webhook_url, pg_url, "office-a"),
            SharedPBX(tmp_path / "b", emulator.webhook_url, pg_url, "office-b"))


def pg_rows(url: str, sql: str, *args: Any) -> List[Dict[str, Any]]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(sql, args).fetchall()


class SharedServicePBX(SharedPBX, ServicePBX):
    """A PBX on the shared store whose call steps `agi-bitrix service` serves over FastAGI."""
