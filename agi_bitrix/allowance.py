"""An in-memory token bucket for one long-lived process (serve, service).

It rations what a stranger can make us ask the portal (installation proofs, widget frames'
tokens), so forged requests cannot spend the request budget that calls need. The portal's own
budget, shared by every process of the PBX, is bitrix/ratelimit.py.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional


class Allowance:
    """`burst` at once, refilled at `per_second`."""

    def __init__(self, burst: float, per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.per_second, self.clock = float(burst), per_second, clock
        self.lock = threading.Lock()
        self.left = self.burst
        self.at = clock()

    def take(self, now: Optional[float] = None) -> bool:
        """Spend one; False (nothing spent) when none is left."""
        with self.lock:
            now = self.clock() if now is None else now
            self.left = min(self.burst, self.left + (now - self.at) * self.per_second)
            self.at = now
            if self.left < 1:
                return False
            self.left -= 1
            return True
