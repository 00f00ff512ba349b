"""The Bitrix24 emulator's widget side: ``placement.bind``/``unbind``/``get``, ``user.current``, and
the tokens and POST form a portal gives a placement frame opened by an employee.

Strict where the docs allow it (Bitrix24 REST docs: api-reference/widgets/placement-bind.md,
placement-unbind.md, placement-get.md, universal/background-worker.md, telephony/call-card.md,
_includes/widget_data.md; api-reference/user/user-current.md):
application context only (a webhook gets WRONG_AUTH_TYPE), administrators only, known placement
codes with their scopes, a handler URL with http(s) and a host that is not ``localhost``,
PAGE_BACKGROUND_WORKER needs ``OPTIONS[errorHandlerUrl]`` and takes one general handler,
``USER_ID`` only for PAGE_BACKGROUND_WORKER, CALL_CARD keeps no OPTIONS.
"""
from __future__ import annotations

import json
import secrets
import urllib.parse
from typing import Any

# placement code -> scopes that must all be granted (placement + the tool's scope)
PLACEMENT_SCOPES: dict[str, tuple[str, ...]] = {
    "CALL_CARD": ("placement", "telephony"),
    "TELEPHONY_ANALYTICS_MENU": ("placement", "telephony"),
    "PAGE_BACKGROUND_WORKER": ("placement",),
}
PLACEMENT_METHODS = {"placement.bind", "placement.unbind", "placement.get"}
FRAME_TTL = 3600


class PlacementsMixin:
    """Mixed into Bitrix24Emulator; every ``_m_*`` runs under the emulator's lock."""

    def _placements_init(self) -> None:
        self._placements: list[dict] = []
        self.admins: set[int] = {self.webhook_user_id}

    # ------------------------------------------------------------------ Python API for tests
    @property
    def placements(self) -> list[dict]:
        with self._lock:
            return [dict(p) for p in self._placements]

    def frame_form(self, user_id: int, placement: str, options: dict | None = None, *,
                   lang: str = "ru") -> tuple[dict[str, str], dict[str, str]]:
        """What the portal sends when employee ``user_id`` opens a placement frame: (query, POST
        body). AUTH_ID is a fresh access token of that employee for this application."""
        with self._lock:
            if int(user_id) not in self._users:
                raise ValueError(f"no user {user_id}")
            access = self._issue_access(int(user_id))
            refresh = secrets.token_hex(24)
            query = {"DOMAIN": self.domain, "PROTOCOL": "0", "LANG": lang, "APP_SID": secrets.token_hex(16)}
            opts = dict(options or {})
            opts.setdefault("URI", "/crm/deal/")
            body = {"AUTH_ID": access, "AUTH_EXPIRES": str(FRAME_TTL), "REFRESH_ID": refresh,
                    "SERVER_ENDPOINT": self.server_endpoint, "APPLICATION_TOKEN": self.application_token,
                    "APPLICATION_SCOPE": ",".join(self.scopes), "member_id": self.member_id, "status": "L",
                    "PLACEMENT": placement, "PLACEMENT_OPTIONS": json.dumps(opts, ensure_ascii=False)}
            return query, body

    # ------------------------------------------------------------------ REST methods
    def _placement_admin(self, ctx: Any, method: str) -> None:
        if ctx.auth == "webhook":
            raise _api_error(403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method. "
                                                   "Application context required")
        if ctx.user_id not in self.admins:
            raise _api_error(403, "ACCESS_DENIED", f"Access denied! Administrator rights are required ({method})")

    def _placement_code(self, up: dict) -> str:
        code = str(up.get("PLACEMENT") or "").strip().upper()
        if not code:
            raise _api_error(400, "ERROR_ARGUMENT", "Argument 'PLACEMENT' is null or empty")
        needed = PLACEMENT_SCOPES.get(code)
        if needed is None or not set(needed) <= set(self.scopes):
            raise _api_error(400, "ERROR_PLACEMENT_NOT_FOUND", "Placement not found")
        return code

    def _m_placement_bind(self, p: dict, ctx: Any) -> bool:
        self._placement_admin(ctx, "placement.bind")
        up = {str(k).upper(): v for k, v in p.items()}
        code = self._placement_code(up)
        handler = str(up.get("HANDLER") or "").strip()
        if not handler:
            raise _api_error(400, "ERROR_ARGUMENT", "Argument 'HANDLER' is null or empty")
        _check_handler(handler)
        options = up.get("OPTIONS") if isinstance(up.get("OPTIONS"), dict) else {}
        user_id = int(up.get("USER_ID") or 0)
        if user_id and code != "PAGE_BACKGROUND_WORKER":
            raise _api_error(400, "ERROR_PLACEMENT_USER_MODE", "User mode is not available")
        kept: Any = []
        if code == "PAGE_BACKGROUND_WORKER":
            error_url = str(options.get("errorHandlerUrl") or "").strip()
            if not error_url:
                raise _api_error(400, "EMPTY_ERROR_HANDLER_URL", "errorHandlerUrl is empty")
            _check_handler(error_url)
            if any(b["placement"] == code and b["userId"] == user_id for b in self._placements):
                raise _api_error(400, "ERROR_PLACEMENT_MAX_COUNT", "Placement max count exceeded")
            kept = {"errorHandlerUrl": error_url}
        elif any(b["placement"] == code and b["handler"] == handler for b in self._placements):
            raise _api_error(400, "ERROR_CORE", "Unable to set placement handler: Handler already binded")
        lang_all = up.get("LANG_ALL") if isinstance(up.get("LANG_ALL"), dict) else {}
        self._placements.append({"placement": code, "userId": user_id, "handler": handler, "options": kept,
                                 "title": str(up.get("TITLE") or ""), "description": str(up.get("DESCRIPTION") or ""),
                                 "langAll": {str(k): dict(v) for k, v in lang_all.items() if isinstance(v, dict)}})
        return True

    def _m_placement_unbind(self, p: dict, ctx: Any) -> dict:
        self._placement_admin(ctx, "placement.unbind")
        up = {str(k).upper(): v for k, v in p.items()}
        code = self._placement_code(up)
        handler = str(up.get("HANDLER") or "").strip()
        user_id = up.get("USER_ID")
        hits = [b for b in self._placements if b["placement"] == code and (not handler or b["handler"] == handler)
                and (user_id in (None, "") or b["userId"] == int(user_id))]
        self._placements = [b for b in self._placements if b not in hits]
        return {"count": 2 * len(hits)}  # counted once per record found and once per removal

    def _m_placement_get(self, p: dict, ctx: Any) -> list:
        self._placement_admin(ctx, "placement.get")
        return [dict(b) for b in self._placements]

    def _m_user_current(self, p: dict, ctx: Any) -> dict:
        user = self._users.get(ctx.user_id)
        if user is None or not user["active"]:
            raise _api_error(401, "NO_AUTH_FOUND", "Wrong authorization data")
        return self._user_row(user)


def _api_error(status: int, code: str, text: str) -> Exception:
    from agi_bitrix.testing.bitrix_emulator import ApiError  # defined beside the emulator that mixes this in

    return ApiError(status, code, text)


def _check_handler(url: str) -> None:
    """A widget handler needs http(s) and a real host: Bitrix24 refuses `localhost` (the docs: links
    to localhost are not acceptable). Loopback IPs stay usable for tests on this machine."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _api_error(400, "ERROR_UNSUPPORTED_PROTOCOL", "Unsupported protocol")
    if not parts.hostname or parts.hostname == "localhost":
        raise _api_error(400, "ERROR_WRONG_HANDLER_URL", "Wrong handler URL")
