"""HTTP to the portal and to the OAuth server, over urllib3 (the transport under requests).

requests cost more than it gave here: about 20 ms of imports on every call step in process
mode, and in the service a scan of the whole environment for proxies before every request. What
of it the connector relied on is kept: connections kept alive and shared by threads, no retry and
no redirect followed behind the caller's back (the client decides both), certifi's CA bundle (or
REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE), gzip, and a proxy named by the environment (https_proxy,
all_proxy, no_proxy), looked up once per host.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError

from agi_bitrix import __version__

HEADERS = {"User-Agent": f"agi-bitrix/{__version__}", "Accept": "application/json",
           "Accept-Encoding": "gzip, deflate"}
POOLS = 4  # portals (hosts) kept per pool: the portal, the OAuth server, an upload host


class Failure(Exception):
    """No answer. `timed_out`: none came in time (else the connection failed); the library's
    error is kept in `error` for a diagnosis (errors.connection_failure), not chained."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(type(error).__name__)
        self.error = error
        # urllib3 counts a refused connection as a connect timeout too (NewConnectionError).
        self.timed_out = isinstance(error, (ReadTimeoutError, TimeoutError)) or (
            isinstance(error, ConnectTimeoutError) and not isinstance(error, NewConnectionError))


Answer = urllib3.BaseHTTPResponse  # .status, .headers, .data, .json()


class Pool:
    """Kept-alive connections, at most `size` at once per host; safe to share between threads."""

    def __init__(self, size: int = 10) -> None:
        self.size = size
        self._managers: Dict[Tuple[str, str], urllib3.PoolManager] = {}
        self._proxies: Dict[Tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def request(self, method: str, url: str, timeout: float, body: Optional[bytes] = None,
                fields: Optional[Mapping[str, Any]] = None, headers: Optional[Mapping[str, str]] = None) -> Answer:
        """One request, its whole answer read; Failure when none came."""
        try:
            return self._manager(url).request(method, url, body=body, fields=fields,
                                              headers={**HEADERS, **(headers or {})}, timeout=timeout,
                                              retries=False, redirect=False)
        except (HTTPError, OSError) as exc:
            raise Failure(exc) from None

    def clear(self) -> None:
        """Close every kept connection."""
        with self._lock:
            managers, self._managers = list(self._managers.values()), {}
        for manager in managers:
            manager.clear()

    def _manager(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        key = (parts.scheme, self._proxy(parts.scheme, parts.hostname or ""))
        manager = self._managers.get(key)
        if manager is None:
            with self._lock:
                manager = self._managers.get(key)
                if manager is None:
                    manager = self._managers[key] = _new_manager(key[0], key[1], self.size)
        return manager

    def _proxy(self, scheme: str, host: str) -> str:
        if not any(name.lower().endswith("_proxy") for name in os.environ):
            return ""
        key = (scheme, host)
        if key not in self._proxies:
            import urllib.request

            found = urllib.request.getproxies_environment()
            bypass = urllib.request.proxy_bypass_environment(host, found) if "no" in found else False
            self._proxies[key] = "" if bypass else found.get(scheme) or found.get("all") or ""
        return self._proxies[key]


def json_body(resp: Answer) -> Any:
    """The answer's JSON, or None when it is not JSON."""
    try:
        return json.loads(resp.data)
    except ValueError:  # not JSON, or not UTF-8
        return None


def _new_manager(scheme: str, proxy: str, size: int) -> urllib3.PoolManager:
    options: Dict[str, Any] = {"num_pools": POOLS, "maxsize": size}
    if scheme == "https":
        options["ca_certs"] = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or _certifi()
    if proxy:
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


def _certifi() -> str:
    import certifi

    return certifi.where()
