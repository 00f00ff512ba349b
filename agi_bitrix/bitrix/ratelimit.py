"""The PBX-wide request budget per portal, shared by every process through one small file.

Bitrix24 counts the requests of a portal per source IP in a leaky bucket (Bitrix24 REST docs:
limits): each
request adds 1, the level drains by Y per second, above X the portal answers 503. Asterisk runs
one process per call step, so the bucket is mirrored in a file under state_dir and updated under
flock: a process reserves the next free slot and sleeps until it comes, which turns a burst of
calls into a short queue instead of a burst of 503s. The same file remembers, per method, the
portal's operating_reset_at and a 429 OPERATION_TIME_LIMIT block (same page), so no process knocks on
a blocked method before the portal frees it.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from agi_bitrix.bitrix.errors import LimitError
from agi_bitrix.deadline import Deadline
from agi_bitrix.ownership import open_private

MIN_REQUEST_TIME = 0.3   # a slot is worth waiting for only if this much budget is left after it
DEFAULT_BLOCK = 60.0     # 429 with no known reset time: one minute-bucket of the 10-minute window
MAX_BLOCK = 660.0        # a reset time further than the window (+ a minute of clock skew) is wrong
FORGET_AFTER = 900.0     # method entries older than this are dropped from the file


def _slug(portal: str) -> str:
    return re.sub(r"[^a-z0-9.-]", "_", portal.lower())[:100] or "portal"


@lru_cache(maxsize=64)
def _bucket_file(state_dir: str, portal: str) -> Path:
    """The bucket's file (`agi-bitrix service` makes a limiter for every call step)."""
    return Path(state_dir) / f"ratelimit-{_slug(portal)}.json"


class RateLimiter:
    def __init__(self, state_dir: str, portal: str, burst: int = 40, per_second: float = 2.0,
                 clock: Any = time.time, sleep: Any = time.sleep) -> None:
        self.path = _bucket_file(str(state_dir), portal)
        self.burst = max(1, int(burst))
        self.rate = float(per_second)
        self.clock = clock
        self.sleep = sleep
        self.waited = 0.0             # seconds this process spent waiting for slots
        self.problem: Optional[str] = None  # why the shared file could not be used, if so

    @contextmanager
    def _state(self) -> Iterator[Optional[Dict[str, Any]]]:
        """The shared state under an exclusive lock, written back if the body changed it.

        Yields None when the file cannot be used: calls then go out unthrottled rather than
        not at all (a broken state folder is reported by the store and by `check`).
        """
        try:
            fd = open_private(self.path)
        except OSError as exc:
            self.problem = f"{self.path}: {exc.strerror or exc}"
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 1 << 16)
            try:
                state = json.loads(raw) if raw else {}
            except ValueError:
                state = {}  # a torn write (crash mid-write): start over, it is only a mirror
            if not isinstance(state, dict):
                state = {}
            before = json.dumps(state, sort_keys=True)
            yield state
            after = json.dumps(state, sort_keys=True)
            if after != before:
                # Overwrite, then cut to length: truncating to zero first makes ext4 flush the
                # file on close (its auto_da_alloc for the truncate-and-rewrite pattern, Linux
                # ext4 docs), a disk write on every request.
                data = after.encode()
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
        finally:
            os.close(fd)  # closing releases the flock

    def _limits(self, state: Dict[str, Any]) -> Tuple[int, float]:
        """(burst, requests per second) of the bucket `state` holds."""
        return self.burst, self.rate

    def _level(self, state: Dict[str, Any], now: float) -> float:
        level = float(state.get("level") or 0.0)
        at = float(state.get("at") or now)
        return max(0.0, level - max(0.0, now - at) * self._limits(state)[1])

    def acquire(self, method: str, deadline: Deadline) -> float:
        """Take one request slot, sleeping until it is due; LimitError if not within `deadline`."""
        with self._state() as state:
            if state is None:
                return 0.0
            now = self.clock()
            until = float((state.get("blocked") or {}).get(method) or 0.0)
            if until > now:
                raise LimitError("OPERATION_TIME_LIMIT", "held back until " + hms(until) +
                                 " (the portal's execution-time limit for this method)", 429, method,
                                 reset_at=until)
            level = self._level(state, now)
            burst, rate = self._limits(state)
            wait = max(0.0, (level + 1.0 - burst) / rate)
            if wait and wait + MIN_REQUEST_TIME > deadline.remaining():
                raise LimitError("RATE_BUDGET", f"this PBX's request budget for the portal is used up "
                                 f"for {wait:.1f} s", None, method, reset_at=now + wait)
            # Reserve the slot now: later processes queue behind it instead of racing for it.
            state["level"], state["at"] = level + 1.0, now
        if wait:
            self.sleep(wait)
            self.waited += wait
        return wait

    def delay(self, reserve: int = 0) -> float:
        """Seconds until a request may go while leaving `reserve` slots of the burst free (for the
        cards of live calls while a backlog drains); 0 = now. Reads the shared state only."""
        with self._state() as state:
            if state is None:
                return 0.0
            level = self._level(state, self.clock())
            burst, rate = self._limits(state)
        room = max(1.0, burst - reserve)
        return max(0.0, (level + 1.0 - room) / rate)

    def room(self) -> int:
        """Requests that may go at once now."""
        with self._state() as state:
            if state is None:
                return self.burst
            return max(0, int(self._limits(state)[0] - self._level(state, self.clock())))

    def blocked_methods(self) -> Dict[str, float]:
        """Methods held back by a 429 now, and until when."""
        with self._state() as state:
            if state is None:
                return {}
            now = self.clock()
            return {m: float(t) for m, t in (state.get("blocked") or {}).items()
                    if isinstance(t, (int, float)) and t > now}

    def saturated(self) -> None:
        """The portal answered 503 QUERY_LIMIT_EXCEEDED: its bucket is full (maybe others share it)."""
        with self._state() as state:
            if state is None:
                return
            self._fill(state, self.clock())

    def _fill(self, state: Dict[str, Any], now: float) -> None:
        """The bucket full to its burst from `now` on (it never empties by this)."""
        state["level"], state["at"] = max(self._level(state, now), float(self._limits(state)[0])), now

    def observe(self, method: str, timing: Any) -> None:
        """Remember the `operating_reset_at` of a good answer: the time a 429 for it would end."""
        reset_at = timing.get("operating_reset_at") if isinstance(timing, dict) else None
        if not isinstance(reset_at, (int, float)) or isinstance(reset_at, bool):
            return
        with self._state() as state:
            if state is None:
                return
            resets = state.setdefault("reset", {})
            if abs(float(resets.get(method) or 0.0) - reset_at) >= 1.0:
                resets[method] = float(reset_at)
                _forget(resets, self.clock())

    def block(self, method: str, reset_at: Optional[float] = None) -> float:
        """The portal answered 429 for `method`: hold it back until its reset time; return that time."""
        with self._state() as state:
            now = self.clock()
            if state is None:
                return now + DEFAULT_BLOCK
            candidates = [reset_at, (state.get("reset") or {}).get(method)]
            known = [float(c) for c in candidates if isinstance(c, (int, float)) and now < c <= now + MAX_BLOCK]
            until = known[0] if known else now + DEFAULT_BLOCK
            blocked = state.setdefault("blocked", {})
            blocked[method] = until
            _forget(blocked, now)
            return until


def _forget(table: Dict[str, Any], now: float) -> None:
    for key in [k for k, v in table.items() if not isinstance(v, (int, float)) or v < now - FORGET_AFTER]:
        del table[key]


def hms(ts: float) -> str:
    """A moment as the PBX's local clock time, for an administrator's message."""
    return time.strftime("%H:%M:%S", time.localtime(ts))
