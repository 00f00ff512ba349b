"""What can go wrong talking to Bitrix24, typed by what the caller should do about it."""
from __future__ import annotations

from typing import Optional


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
    """No answer in time, connection refused, TLS failure, 5xx: may heal by itself."""

    retryable = True


# Codes by meaning (reference §1.2-1.3, §2). A code decides before the HTTP status does.
_AUTH = {"no_auth_found", "invalid_token", "payment_required", "not_installed",
         "application_not_found", "invalid_grant", "invalid_client", "portal_deleted",
         "authorization_error"}
# The credentials are fine but not allowed to do this: more scopes, rights or an application.
_SCOPE = {"insufficient_scope", "invalid_scope", "access_denied", "user_access_error",
          "invalid_credentials", "wrong_auth_type"}
# OVERLOAD_LIMIT is a manual block by Bitrix24 support: retryable, but only much later.
_LIMIT = {"query_limit_exceeded", "operation_time_limit", "overload_limit"}
_NOT_FOUND = {"error_method_not_found", "not_found"}


def classify(status: int, code: str, description: str, method: str,
             reset_at: Optional[float] = None) -> BitrixError:
    """Map an error body to its type. Codes come in any case (reference §0)."""
    low = (code or "").lower()
    if low == "expired_token":
        return ExpiredToken(code, description, status, method)
    if low in _SCOPE:
        return ScopeError(code, description, status, method)
    if low in _AUTH or (status == 401 and low not in _LIMIT):
        return AuthError(code, description, status, method)
    if low in _LIMIT or status == 429:
        return LimitError(code, description, status, method, reset_at=reset_at)
    if low in _NOT_FOUND or "not found" in (description or "").lower():
        return NotFoundError(code, description, status, method)
    if status >= 500:
        return NetworkError(code or f"HTTP_{status}", description, status, method)
    return PortalError(code or f"HTTP_{status}", description, status, method)
