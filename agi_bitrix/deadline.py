"""The time budget of one event on the caller's path.

Socket timeouts alone do not bound a request (a portal dripping bytes resets the read timeout).
In the main thread (process mode) a real-time interval timer interrupts the request at the
deadline. Signals reach only the main thread, so a step served by a thread of `agi-bitrix service`
runs the request in a helper thread and stops waiting for it at the deadline.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, TypeVar

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """The event's time budget ran out."""


class Deadline:
    def __init__(self, seconds: Optional[float], started: Optional[float] = None) -> None:
        # `started` lets the budget count from process start, which is what the caller waits for.
        self.started = time.monotonic() if started is None else started
        self.seconds = seconds

    def remaining(self) -> float:
        if self.seconds is None:
            return float("inf")
        return max(0.0, self.seconds - (time.monotonic() - self.started))

    def expired(self) -> bool:
        return self.remaining() <= 0

    @contextmanager
    def enforce(self) -> Iterator[float]:
        """Run the body with a hard limit of the remaining budget (main thread only)."""
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded("time budget used up")
        if left == float("inf") or threading.current_thread() is not threading.main_thread():
            yield left
            return

        def _alarm(signum: int, frame: object) -> None:
            raise DeadlineExceeded("time budget used up")

        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, left)
        try:
            yield left
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def call(self, fn: Callable[[], T]) -> T:
        """fn() with a hard limit of the remaining budget, in any thread."""
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded("time budget used up")
        if left == float("inf"):
            return fn()
        if threading.current_thread() is threading.main_thread():
            with self.enforce():
                return fn()
        # The abandoned request ends on its own socket timeout; its outcome is unknown, which the
        # outbox handles as it does for a request cut by the timer (sending_at stays set).
        box: Dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the waiting step
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name="budgeted-request", daemon=True).start()
        if not done.wait(left):
            raise DeadlineExceeded("time budget used up")
        if "error" in box:
            raise box["error"]
        return box["value"]
