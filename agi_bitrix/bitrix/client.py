"""The Bitrix24 REST client: one POST per call, typed errors, the event's deadline, batch.

Inside one call it handles what only it can: the PBX-wide rate budget (ratelimit.py), a 503
QUERY_LIMIT_EXCEEDED retried with growing backoff while the deadline allows, a 429 remembered
until the portal frees the method, and one retry after the auth object renewed an expired token.
Everything else that is retryable goes back to the caller (an AGI event with a tight budget, or
the outbox), which decides what to do with it.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from agi_bitrix.bitrix import query
from agi_bitrix.bitrix.auth import Auth
from agi_bitrix.bitrix.errors import (AuthError, BitrixError, ExpiredToken, LimitError, NetworkError,
                                      PortalError, classify, connection_failure)
from agi_bitrix.bitrix.http import Answer, Failure, Pool, Transport, json_body
from agi_bitrix.bitrix.ratelimit import MIN_REQUEST_TIME, RateLimiter
from agi_bitrix.deadline import Deadline, DeadlineExceeded

BATCH_MAX = 50
ADMIN_BUDGET = 30.0      # seconds of waiting (rate budget, backoff) for a call made without a deadline
BACKOFF_FIRST = 0.5      # first pause after a 503; doubles each time, with jitter
BACKOFF_MAX = 8.0


class BatchResult:
    """A `batch` answer: results and errors by command key (empty maps may arrive as [])."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        def _map(value: Any) -> Dict[str, Any]:
            # PHP sends an empty map as [] and a map keyed 0..n-1 as a list (Bitrix24 REST docs: batch).
            if isinstance(value, list):
                return {str(i): item for i, item in enumerate(value)}
            return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}

        self.results = _map(body.get("result"))
        self.errors = _map(body.get("result_error"))
        self.totals = _map(body.get("result_total"))
        self.next = _map(body.get("result_next"))

    def error(self, key: str, method: str = "") -> Optional[BitrixError]:
        err = self.errors.get(key)
        if not err:
            return None
        if isinstance(err, dict):
            return classify(400, str(err.get("error", "")), str(err.get("error_description", "")), method or key)
        return PortalError(str(err), "", None, method or key)


class Bitrix24:
    def __init__(self, auth: Auth, timeout: float = 2.0, session: Optional[Transport] = None,
                 limiter: Optional[RateLimiter] = None) -> None:
        self.auth = auth
        self.timeout = timeout
        self.limiter = limiter
        self.http = session or Pool()  # handed in: the service's one pool, shared by its threads
        self.requests_made = 0
        self.portal_seconds = 0.0  # spent waiting for the portal's answers (for the step's log line)
        self.limit_retries = 0  # 503 answers retried by this client (for logs and benchmarks)
        # Told of every request (method, HTTP status or 0 when no answer): the service's metrics.
        self.observe: Optional[Callable[[str, int], None]] = None

    # -- plumbing ------------------------------------------------------------------------------
    def _post(self, url: str, payload: Dict[str, Any], method: str, deadline: Optional[Deadline]) -> Answer:
        timeout = self.timeout if deadline is None else min(self.timeout, deadline.remaining())
        if timeout <= 0:
            raise NetworkError("TIMEOUT", "time budget used up before the request", None, method)
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        self.requests_made += 1
        sent = time.monotonic()
        try:
            resp = _bounded(deadline, lambda: self.http.request("POST", url, timeout, body=body, headers=headers))
            # A renamed portal answers 302; a blindly followed POST would lose its body (Bitrix24 REST
            # docs: how to call the REST API after a domain change).
            if resp.status in (301, 302, 307, 308) and resp.headers.get("Location"):
                resp = _bounded(deadline, lambda: self.http.request("POST", resp.headers["Location"], timeout,
                                                                    body=body, headers=headers))
        except (Failure, DeadlineExceeded) as exc:
            self._observed(method, 0)
            if isinstance(exc, Failure) and not exc.timed_out:
                cause, text = connection_failure(exc.error, url)
                raise NetworkError("UNREACHABLE", text, None, method, cause=cause)
            raise NetworkError("TIMEOUT", f"no answer within {timeout:.1f} s", None, method, cause="timeout")
        finally:
            self.portal_seconds += time.monotonic() - sent
        self._observed(method, resp.status)
        return resp

    def _observed(self, method: str, status: int) -> None:
        if self.observe is not None:
            self.observe(method, status)

    def call_raw(self, method: str, params: Optional[Dict[str, Any]] = None,
                 deadline: Optional[Deadline] = None) -> Dict[str, Any]:
        """Call a method; return the whole body ({"result", "total", "next", "time"})."""
        budget = deadline if deadline is not None else Deadline(ADMIN_BUDGET)
        # At most one refresh and one reload per call: a long-lived process may hold a pair that
        # others rotated (invalid_token) and then find the stored one expired as well.
        refreshed = reloaded = False
        pause = BACKOFF_FIRST
        while True:
            base, extra = self.auth.credentials()
            payload = dict(params or {})
            payload.update(extra)
            self._slot(method, budget)
            try:
                return self._answer(self._post(base + method, payload, method, deadline), method)
            except ExpiredToken:
                if refreshed or not self.auth.on_expired(extra, budget):
                    raise
                refreshed = True
            except AuthError as err:
                # invalid_token: another process rotated the pair after we read it.
                if reloaded or err.code.lower() != "invalid_token" or not self.auth.on_rejected(
                        extra, budget):
                    raise
                reloaded = True
            except LimitError as err:
                if err.status == 429 and self.limiter is not None:
                    err.reset_at = self.limiter.block(method, err.reset_at)
                if err.code.upper() != "QUERY_LIMIT_EXCEEDED":
                    raise
                if self.limiter is not None:
                    self.limiter.saturated()
                import random  # a 503 only: a step that is never refused never loads it

                delay = pause * random.uniform(0.75, 1.25)  # jitter: processes must not retry in step
                if delay + MIN_REQUEST_TIME > budget.remaining():
                    raise
                time.sleep(delay)
                self.limit_retries += 1
                pause = min(pause * 2, BACKOFF_MAX)

    def _slot(self, method: str, budget: Deadline) -> None:
        if self.limiter is not None:
            self.limiter.acquire(method, budget)

    def _answer(self, resp: Answer, method: str) -> Dict[str, Any]:
        """The body of a good answer, or the typed error of a bad one."""
        body = json_body(resp)
        if not isinstance(body, dict):
            raise classify(resp.status if resp.status >= 400 else 502,
                           f"HTTP_{resp.status}", "the answer is not JSON", method)
        timing = body.get("time") if isinstance(body.get("time"), dict) else {}
        if "error" in body or resp.status >= 400:
            raise classify(resp.status, str(body.get("error", "")), str(body.get("error_description", "")),
                           method, reset_at=timing.get("operating_reset_at"))
        if self.limiter is not None:
            self.limiter.observe(method, timing)
        return body

    def call(self, method: str, params: Optional[Dict[str, Any]] = None,
             deadline: Optional[Deadline] = None) -> Any:
        return self.call_raw(method, params, deadline).get("result")

    def upload(self, url: str, field: str, filename: str, content: Any,
               deadline: Optional[Deadline] = None) -> Any:
        """Second step of a large upload: multipart POST of the file to the portal's uploadUrl."""
        timeout = self.timeout if deadline is None else min(self.timeout, deadline.remaining())
        self._slot("upload", deadline if deadline is not None else Deadline(ADMIN_BUDGET))
        self.requests_made += 1
        data = content.read() if hasattr(content, "read") else content
        try:
            resp = _bounded(deadline, lambda: self.http.request("POST", url, timeout,
                                                                fields={field: (filename, data)}))
        except DeadlineExceeded:
            raise NetworkError("UPLOAD_FAILED", f"no answer within {timeout:.1f} s", None, "upload",
                               cause="timeout")
        except Failure as exc:
            cause, text = connection_failure(exc.error, url)
            raise NetworkError("UPLOAD_FAILED", text, None, "upload", cause=cause)
        if resp.status >= 400:
            raise classify(resp.status, f"HTTP_{resp.status}", "upload refused", "upload")
        return resp.data.decode("utf-8", "replace")

    def batch(self, commands: Dict[str, Tuple[str, Dict[str, Any]]], halt: bool = False,
              deadline: Optional[Deadline] = None) -> BatchResult:
        """Several calls in one request; values may reference earlier results as `$result[key][FIELD]`."""
        if not commands:
            return BatchResult({})
        if len(commands) > BATCH_MAX:
            raise ValueError(f"batch takes at most {BATCH_MAX} commands")
        cmd = {key: f"{method}?{query.build(params)}" for key, (method, params) in commands.items()}
        return BatchResult(self.call("batch", {"halt": 1 if halt else 0, "cmd": cmd}, deadline) or {})


def _bounded(deadline: Optional[Deadline], fn: Callable[[], Answer]) -> Answer:
    return fn() if deadline is None else deadline.call(fn)

