"""The service's threads queue for the database's one write lock instead of polling SQLite for it."""
from __future__ import annotations

import threading

from conftest import ServicePBX

from agi_bitrix.store import StoreError

WAIT = 60.0


class SpyLock:
    """The service's write lock, telling the test when a thread starts waiting for it."""

    def __init__(self) -> None:
        self.inner = threading.RLock()
        self.waiting = threading.Event()

    def __enter__(self) -> "SpyLock":
        if threading.current_thread().name == "second":
            self.waiting.set()
        self.inner.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.release()


def test_a_step_waits_for_another_threads_write_instead_of_failing(tmp_path, emulator):
    pbx = ServicePBX(tmp_path, emulator.webhook_url).start()
    try:
        host = pbx.service
        host._write_lock = SpyLock()
        settings = host.load_settings()
        first, second = host.store(settings), host.store(settings)  # two connections of the pool
        # A short SQLite busy wait: without the queue the second writer gives up while the first
        # still holds the database (the test holds it until the second is seen waiting); the 2 s
        # only spare it a brief write of the service's own deliverer.
        second.db.execute("PRAGMA busy_timeout = 2000")
        holding, go, outcome = threading.Event(), threading.Event(), []

        def write_first() -> None:
            with first._tx():
                holding.set()
                go.wait(WAIT)

        def write_second() -> None:
            try:
                outcome.append(second.start_call("1795900000.1", "incoming", "+79161234567", "", "101",
                                                  {"EXTERNAL_CALL_ID": "1795900000.1"}, "test", 10.0))
            except StoreError as exc:
                outcome.append(exc)
            finally:
                host._write_lock.waiting.set()  # whatever happened, the test need not wait on

        a = threading.Thread(target=write_first)
        a.start()
        assert holding.wait(WAIT)
        b = threading.Thread(target=write_second, name="second")
        b.start()
        assert host._write_lock.waiting.wait(WAIT)
        assert not outcome, f"the second writer did not queue on the service's lock: {outcome}"
        go.set()
        a.join(WAIT)
        b.join(WAIT)
        assert [type(o) for o in outcome] == [int]  # the register entry, queued
        assert first.call("1795900000.1").phone == "+79161234567"
        host.close(first)
        host.close(second)
    finally:
        pbx.stop()
