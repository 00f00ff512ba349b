"""The call steps of the last hour as the log recorded them (one JSON line per step)."""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

TAIL_BYTES = 4 * 1024 * 1024  # the end of a busy day's log; older lines are not "right now"


def recent_steps(log_file: Path, within: float, now: Optional[float] = None) -> List[Dict[str, Any]]:
    """AGI step lines (they carry `status`) newer than `within` seconds, oldest first."""
    try:
        with log_file.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - TAIL_BYTES))
            data = fh.read()
    except OSError:
        return []
    since = (time.time() if now is None else now) - within
    steps = []
    for raw in data.splitlines():
        try:
            line = json.loads(raw)
            when = datetime.fromisoformat(str(line["time"])).timestamp()
        except (ValueError, KeyError, TypeError):
            continue  # a cut first line, or not ours
        if isinstance(line, dict) and "status" in line and when >= since:
            steps.append(line)
    return steps
