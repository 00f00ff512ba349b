"""The time budget of one event on the caller's path.

Socket timeouts alone do not bound a request (a portal dripping bytes resets the read timeout),
so while a request runs a real-time interval timer is armed that interrupts it at the deadline.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional


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
