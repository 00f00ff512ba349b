"""Talk time of a call (or of one part of a transferred call), as Asterisk counts it.

Asterisk's own count comes first: ANSWEREDTIME, set on the caller's channel when the bridge of
the Dial (Asterisk apps/app_dial.c) or, in recent releases, the Queue (apps/app_queue.c) that
connected ends, in whole seconds from the moment the caller's channel was answered, i.e. the
bridge. The `answer` step runs in Dial's U() gosub, before that bridge, so the span between it
and the hangup step is never shorter than the talk: it is the fallback (floored, never rounded
up) and the bound that tells a foreign ANSWEREDTIME apart. One longer than the part's own span
is not this part's count: after an attended transfer the caller is still in the Dial that
connected the first employee, and a caller answered before Dial (an IVR) has that time in it.
"""
from __future__ import annotations

import re
from typing import Optional

MAX_SECONDS = 7 * 24 * 3600


def parse_seconds(raw: Optional[str]) -> Optional[int]:
    """ANSWEREDTIME as Asterisk writes it (decimal digits), or None when empty or junk."""
    if raw is None or not re.fullmatch(r"[0-9]{1,9}", raw.strip()):
        return None
    return min(int(raw.strip()), MAX_SECONDS)


def talk_seconds(answered_at: Optional[float], now: float, answeredtime: Optional[int]) -> int:
    """DURATION of a part: Asterisk's ANSWEREDTIME when it is this part's, else our span, floored."""
    span = None if answered_at is None else min(MAX_SECONDS, max(0, int(now - answered_at)))
    if answeredtime is not None and (span is None or answeredtime <= span):
        return answeredtime
    return span or 0
