"""Calls registered and never finished: their hangup step never ran (a step killed, the PBX
restarted mid-call), so nothing would ever close them and their cards would stay open in
Bitrix24. The deliverer (worker, `outbox flush`) closes them after `[calls] max_call_length`."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from agi_bitrix.controllers.hangup import finish_of
from agi_bitrix.store import Store

REASON = "no hangup was reported within max_call_length"


def close_abandoned(store: Store, settings: Any, owner: str, now: Optional[float] = None) -> List[Dict[str, Any]]:
    """Queue the finish of every abandoned call, with its best known status: talked if it was
    answered (talk time unknown: 0), else missed (incoming) or cancelled (outgoing). Returns one
    log record per call closed."""
    now = time.time() if now is None else now
    closed = []
    for call in store.abandoned_calls(now - settings.calls.max_call_length):
        params, hide = finish_of(settings, call, "")
        if params["STATUS_CODE"] != "200":
            params["FAILED_REASON"] = REASON
        # lease 0: the flush that follows delivers it at once.
        if store.queue_finish(call.linkedid, params, None, owner, 0.0, hide=hide) is None:
            continue  # its hangup step got there first
        closed.append({"linkedid": call.linkedid, "status_code": params["STATUS_CODE"],
                       "user": params["USER_PHONE_INNER"], "answered": call.answered_at is not None,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(call.started_at)),
                       "reason": REASON})
    return closed
