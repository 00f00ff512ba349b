"""The Bitrix24 REST client: one POST per call, typed errors, the event's deadline, batch.

Retry and throttling policy are deliberately not here: the caller (an AGI event with a tight
budget, or a background flush) decides what to do with a retryable error.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Any, Dict, List, Mapping, Optional, Tuple

import requests

from agi_bitrix import __version__
from agi_bitrix.bitrix import query
from agi_bitrix.bitrix.auth import Auth
from agi_bitrix.bitrix.errors import BitrixError, ExpiredToken, NetworkError, PortalError, classify
from agi_bitrix.deadline import Deadline, DeadlineExceeded

USER_AGENT = f"agi-bitrix/{__version__}"
BATCH_MAX = 50


class BatchResult:
    """A `batch` answer: results and errors by command key (empty maps may arrive as [])."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        def _map(value: Any) -> Dict[str, Any]:
            return dict(value) if isinstance(value, dict) else {}

        self.results = _map(body.get("result"))
        self.errors = _map(body.get("result_error"))
        self.totals = _map(body.get("result_total"))

    def error(self, key: str, method: str = "") -> Optional[BitrixError]:
        err = self.errors.get(key)
        if not err:
            return None
        if isinstance(err, dict):
            return classify(400, str(err.get("error", "")), str(err.get("error_description", "")), method or key)
        return PortalError(str(err), "", None, method or key)


class Bitrix24:
    def __init__(self, auth: Auth, timeout: float = 2.0, session: Optional[requests.Session] = None) -> None:
        self.auth = auth
        self.timeout = timeout
        self.http = session or requests.Session()
        self.http.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
        self.requests_made = 0

    # -- plumbing ------------------------------------------------------------------------------
    def _post(self, url: str, payload: Dict[str, Any], method: str, deadline: Optional[Deadline]) -> requests.Response:
        timeout = self.timeout if deadline is None else min(self.timeout, deadline.remaining())
        if timeout <= 0:
            raise NetworkError("TIMEOUT", "time budget used up before the request", None, method)
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        self.requests_made += 1
        try:
            if deadline is None:
                resp = self.http.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
            else:
                with deadline.enforce():
                    resp = self.http.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
            # A renamed portal answers 302; a blindly followed POST would lose its body (reference §0).
            if resp.status_code in (301, 302, 307, 308) and resp.headers.get("Location"):
                with (deadline.enforce() if deadline else nullcontext()):
                    resp = self.http.post(resp.headers["Location"], data=body, headers=headers,
                                          timeout=timeout, allow_redirects=False)
        except DeadlineExceeded:
            raise NetworkError("TIMEOUT", f"no answer within {timeout:.1f} s", None, method)
        except requests.Timeout:
            raise NetworkError("TIMEOUT", f"no answer within {timeout:.1f} s", None, method)
        except requests.RequestException as exc:
            raise NetworkError("UNREACHABLE", _short(exc), None, method)
        return resp

    def call_raw(self, method: str, params: Optional[Dict[str, Any]] = None,
                 deadline: Optional[Deadline] = None) -> Dict[str, Any]:
        """Call a method; return the whole body ({"result", "total", "next", "time"})."""
        for attempt in (1, 2):
            base, extra = self.auth.credentials()
            payload = dict(params or {})
            payload.update(extra)
            resp = self._post(base + method, payload, method, deadline)
            try:
                body = resp.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise classify(resp.status_code if resp.status_code >= 400 else 502,
                               f"HTTP_{resp.status_code}", "the answer is not JSON", method)
            if "error" in body or resp.status_code >= 400:
                reset_at = (body.get("time") or {}).get("operating_reset_at") if isinstance(body.get("time"), dict) else None
                err = classify(resp.status_code, str(body.get("error", "")), str(body.get("error_description", "")),
                               method, reset_at=reset_at)
                if isinstance(err, ExpiredToken) and attempt == 1 and self.auth.on_expired(extra):
                    continue
                raise err
            return body
        raise AssertionError("unreachable")

    def call(self, method: str, params: Optional[Dict[str, Any]] = None,
             deadline: Optional[Deadline] = None) -> Any:
        return self.call_raw(method, params, deadline).get("result")

    def upload(self, url: str, field: str, filename: str, content: Any,
               deadline: Optional[Deadline] = None) -> Any:
        """Second step of a large upload: multipart POST of the file to the portal's uploadUrl."""
        timeout = self.timeout if deadline is None else min(self.timeout, deadline.remaining())
        self.requests_made += 1
        try:
            with (deadline.enforce() if deadline else nullcontext()):
                resp = self.http.post(url, files={field: (filename, content)}, timeout=timeout)
        except (DeadlineExceeded, requests.RequestException) as exc:
            raise NetworkError("UPLOAD_FAILED", _short(exc), None, "upload")
        if resp.status_code >= 400:
            raise classify(resp.status_code, f"HTTP_{resp.status_code}", "upload refused", "upload")
        return resp.text

    def batch(self, commands: Dict[str, Tuple[str, Dict[str, Any]]], halt: bool = False,
              deadline: Optional[Deadline] = None) -> BatchResult:
        """Several calls in one request; values may reference earlier results as `$result[key][FIELD]`."""
        if not commands:
            return BatchResult({})
        if len(commands) > BATCH_MAX:
            raise ValueError(f"batch takes at most {BATCH_MAX} commands")
        cmd = {key: f"{method}?{query.build(params)}" for key, (method, params) in commands.items()}
        return BatchResult(self.call("batch", {"halt": 1 if halt else 0, "cmd": cmd}, deadline) or {})


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # urllib3 messages repeat the pool and URL; keep the cause.
    if "Caused by" in text:
        text = text.split("Caused by", 1)[1].strip(" ()")
    return text[:200]
