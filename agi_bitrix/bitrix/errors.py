"""What can go wrong talking to Bitrix24, typed by what the caller should do about it."""
from __future__ import annotations

import socket
import ssl
from typing import Iterator, Optional, Tuple
from urllib.parse import urlsplit


class BitrixError(Exception):
    """Base: `retryable` says whether the same request may succeed later."""

    retryable = False

    def __init__(self, code: str, description: str = "", status: Optional[int] = None,
                 method: str = "") -> None:
        self.code = code
        self.description = description
        self.status = status
        self.method = method
        super().__init__(self.summary())

    def summary(self) -> str:
        where = f"{self.method}: " if self.method else ""
        status = f"HTTP {self.status} " if self.status else ""
        text = f"{where}{status}{self.code}"
        return f"{text} ({self.description})" if self.description else text


class AuthError(BitrixError):
    """Wrong webhook code, expired or revoked token, app not installed: an administrator must act."""


class ExpiredToken(AuthError):
    """401 expired_token (refresh and retry once), or a refresh another process has not finished yet."""

    retryable = True


class ScopeError(BitrixError):
    """The webhook or application lacks a permission (scope) or an access right."""


class LimitError(BitrixError):
    """503 QUERY_LIMIT_EXCEEDED, 429 OPERATION_TIME_LIMIT, or this PBX's own request budget
    for the portal used up: wait (until `reset_at` when known) and retry."""

    retryable = True

    def __init__(self, *args: object, reset_at: Optional[float] = None, **kw: object) -> None:
        self.reset_at = reset_at
        super().__init__(*args, **kw)  # type: ignore[arg-type]


class NotFoundError(BitrixError):
    """The method or the object does not exist (unknown method, call not found)."""


class PortalError(BitrixError):
    """The portal refused the data (ERROR_CORE and friends): retrying the same request won't help."""


class NetworkError(BitrixError):
    """No answer in time, connection refused, TLS failure, 5xx: may heal by itself.

    `cause` says which, for a diagnosis: dns, refused, tls, timeout or '' (anything else).
    """

    retryable = True

    def __init__(self, *args: object, cause: str = "", **kw: object) -> None:
        self.cause = cause
        super().__init__(*args, **kw)  # type: ignore[arg-type]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (urllib3 or http.client -> socket, ssl), each once."""
    seen, todo = set(), [exc]
    while todo:
        item = todo.pop()
        # ssl's errors carry a text `reason` (CERTIFICATE_VERIFY_FAILED), urllib3's an exception.
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [item.__cause__, item.__context__, getattr(item, "reason", None)]  # type: ignore[list-item]
        todo += [a for a in getattr(item, "args", ()) if isinstance(a, BaseException)]


def connection_failure(exc: BaseException, url: str) -> Tuple[str, str]:
    """(cause, one plain sentence) for a failed connection, instead of the HTTP library's repr."""
    parts = urlsplit(url)
    host, port = parts.hostname or "?", parts.port or (443 if parts.scheme == "https" else 80)
    chain = list(_chain(exc))
    if any(isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError" for e in chain):
        return "dns", f"the name {host} does not resolve (DNS)"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "refused", f"{host} refused the connection on port {port}"
    if any(isinstance(e, (ssl.SSLError, ssl.CertificateError)) for e in chain):
        return "tls", f"the TLS handshake with {host} failed (certificate or protocol)"
    if any(isinstance(e, (socket.timeout, TimeoutError)) for e in chain):
        return "timeout", f"{host} did not answer"
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return "", f"{host}:{port}: {e.strerror}"
    return "", f"{host}:{port}: {type(exc).__name__}"


# Codes by meaning (Bitrix24 REST docs: system errors, OAuth error codes, limits). A code decides
# before the HTTP status does.
_AUTH = {"no_auth_found", "invalid_token", "payment_required", "not_installed",
         "application_not_found", "invalid_grant", "invalid_client", "portal_deleted",
         "authorization_error"}
# The credentials are fine but not allowed to do this: more scopes, rights or an application.
_SCOPE = {"insufficient_scope", "invalid_scope", "access_denied", "user_access_error",
          "invalid_credentials", "wrong_auth_type"}
# OVERLOAD_LIMIT is a manual block by Bitrix24 support: retryable, but only much later.
_LIMIT = {"query_limit_exceeded", "operation_time_limit", "overload_limit"}
_NOT_FOUND = {"error_method_not_found", "not_found"}
# The portal failed, not the request: inside a batch the command's error comes without its HTTP
# status (Bitrix24 REST docs: batch), so the code says it.
_SERVER = {"internal_server_error"}


def classify(status: int, code: str, description: str, method: str,
             reset_at: Optional[float] = None) -> BitrixError:
    """Map an error body to its type. Codes come in any case (Bitrix24 REST docs: system errors)."""
    low = (code or "").lower()
    if low == "expired_token":
        return ExpiredToken(code, description, status, method)
    if low in _SCOPE:
        return ScopeError(code, description, status, method)
    if low in _AUTH or (status == 401 and low not in _LIMIT):
        return AuthError(code, description, status, method)
    if low in _LIMIT or status == 429:
        return LimitError(code, description, status, method, reset_at=reset_at)
    if low in _SERVER:
        return NetworkError(code, description, max(status, 500), method)
    if low in _NOT_FOUND or "not found" in (description or "").lower():
        return NotFoundError(code, description, status, method)
    if status >= 500:
        return NetworkError(code or f"HTTP_{status}", description, status, method)
    return PortalError(code or f"HTTP_{status}", description, status, method)
