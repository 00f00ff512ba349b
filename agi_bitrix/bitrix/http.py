"""HTTP to the portal and to the OAuth server: two ways to the same requests, answers and errors.

- Pool (urllib3, the transport under requests): connections kept alive and shared by the threads
  of a long-lived process (`agi-bitrix service`, the worker), one the portal dropped while idle
  replaced before it is used.
- Direct (the standard library's http.client): a process-mode call step, whose one or two
  requests need no pool. Importing urllib3 costs such a step about 25 ms of CPU (compiling its
  URL patterns alone takes most of it), a fifth of all it does. A proxy or a file upload goes
  through a Pool there too.

Both follow no redirect and retry nothing behind the caller's back (the client decides both),
check certificates against certifi's bundle (or REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE), as requests
did, and use a proxy the environment names (https_proxy, all_proxy, no_proxy).
"""
from __future__ import annotations

import http.client  # here: a request taking its rate slot must not wait for an import after it
import json
import os
import threading
from typing import Any, Dict, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

from agi_bitrix import __version__

HEADERS = {"User-Agent": f"agi-bitrix/{__version__}", "Accept": "application/json"}
POOLS = 4  # hosts kept per pool: the portal, the OAuth server, an upload host


class Failure(Exception):
    """No answer. `timed_out`: none came in time (else the connection failed). The library's
    error is kept in `error` for a diagnosis (errors.connection_failure), not chained: its text
    may hold the URL."""

    def __init__(self, error: BaseException, timed_out: bool) -> None:
        super().__init__(type(error).__name__)
        self.error = error
        self.timed_out = timed_out


class Answer:
    """An answer read whole: `status`, `headers` (get() ignores case) and `data` (bytes)."""

    def __init__(self, status: int, headers: Any, data: bytes) -> None:
        self.status = status
        self.headers = headers
        self.data = data


Transport = Union["Pool", "Direct"]


def json_body(answer: Answer) -> Any:
    """The answer's JSON, or None when it is not JSON."""
    try:
        return json.loads(answer.data)
    except ValueError:  # not JSON, or not UTF-8
        return None


def ca_bundle() -> str:
    found = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if found:
        return found
    import certifi

    return certifi.where()


def proxy_for(scheme: str, host: str) -> str:
    """The proxy the environment names for this address ('' = none, or the host bypasses it)."""
    if not any(name.lower().endswith("_proxy") for name in os.environ):
        return ""
    import urllib.request

    found = urllib.request.getproxies_environment()
    if "no" in found and urllib.request.proxy_bypass_environment(host, found):
        return ""
    return found.get(scheme) or found.get("all") or ""


class Pool:
    """Kept-alive connections, at most `size` at once per host; safe to share between threads."""

    def __init__(self, size: int = 10) -> None:
        self.size = size
        self._managers: Dict[Tuple[str, str], Any] = {}
        self._proxies: Dict[Tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def request(self, method: str, url: str, timeout: float, body: Optional[bytes] = None,
                fields: Optional[Mapping[str, Any]] = None, headers: Optional[Mapping[str, str]] = None) -> Answer:
        """One request, its whole answer read (`fields`: a GET's query, or a multipart POST's
        parts); Failure when none came."""
        from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError

        try:
            resp = self._manager(url).request(method, url, body=body, fields=fields,
                                              headers={**HEADERS, "Accept-Encoding": "gzip, deflate",
                                                       **(headers or {})},
                                              timeout=timeout, retries=False, redirect=False)
        except (HTTPError, OSError) as exc:
            # urllib3 counts a refused connection as a connect timeout too (NewConnectionError).
            late = isinstance(exc, (ReadTimeoutError, TimeoutError)) or (
                isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError))
            raise Failure(exc, late) from None
        return Answer(resp.status, resp.headers, resp.data)

    def _manager(self, url: str) -> Any:
        parts = urlsplit(url)
        host = (parts.scheme, parts.hostname or "")
        if host not in self._proxies:
            self._proxies[host] = proxy_for(*host)
        key = (parts.scheme, self._proxies[host])
        with self._lock:
            manager = self._managers.get(key)
            if manager is None:
                manager = self._managers[key] = _new_manager(*key, self.size)
        return manager


def _new_manager(scheme: str, proxy: str, size: int) -> Any:
    import urllib3

    options: Dict[str, Any] = {"num_pools": POOLS, "maxsize": size}
    if scheme == "https":
        options["ca_certs"] = ca_bundle()
    return urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)


class Direct:
    """One process's few requests, over one connection per host (process mode; one thread)."""

    def __init__(self) -> None:
        self._open: Dict[Tuple[str, str, Optional[int]], Any] = {}
        self._pool: Optional[Pool] = None
        self._tls: Any = None

    def request(self, method: str, url: str, timeout: float, body: Optional[bytes] = None,
                fields: Optional[Mapping[str, Any]] = None, headers: Optional[Mapping[str, str]] = None) -> Answer:
        parts = urlsplit(url)
        if fields is not None or proxy_for(parts.scheme, parts.hostname or ""):
            if self._pool is None:
                self._pool = Pool(2)
            return self._pool.request(method, url, timeout, body, fields, headers)
        key = (parts.scheme, parts.hostname or "", parts.port)
        conn = self._open.pop(key, None) or self._connect(*key, timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, target, body=body, headers={**HEADERS, **(headers or {})})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise Failure(exc, isinstance(exc, TimeoutError)) from None
        except BaseException:  # the step's budget ran out mid-request: the connection is spoilt
            conn.close()
            raise
        if not resp.will_close:
            self._open[key] = conn
        else:
            conn.close()
        return Answer(resp.status, resp.msg, data)

    def _connect(self, scheme: str, host: str, port: Optional[int], timeout: float) -> Any:
        if scheme != "https":
            return http.client.HTTPConnection(host, port, timeout=timeout)
        if self._tls is None:
            import ssl

            self._tls = ssl.create_default_context(cafile=ca_bundle())
        return http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls)
