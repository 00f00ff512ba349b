"""The one place that turns settings into a ready Bitrix24 client (webhook or OAuth)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

from agi_bitrix.bitrix.auth import Auth, WebhookAuth
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.bitrix.http import Transport
from agi_bitrix.bitrix.ratelimit import RateLimiter
from agi_bitrix.settings_file import OAUTH_KEYS

if TYPE_CHECKING:
    from agi_bitrix.settings import Settings


class NotConfigured(Exception):
    """No usable Bitrix24 connection in the settings; the message says what to set."""


def make_client(settings: Settings, http: Optional[Transport] = None,
                auth: Optional[Auth] = None) -> Bitrix24:
    """A client; `agi-bitrix service` passes its one connection pool and its one shared auth, a
    process-mode step its one direct connection."""
    b24 = settings.bitrix24
    if auth is None:
        auth = make_auth(settings)
    # Every process on this PBX draws from one budget per portal (the portal counts per source IP).
    portal = urlsplit(b24.webhook_url or b24.portal_url).netloc
    limiter: RateLimiter
    if settings.storage.url:  # one bucket for every PBX of the portal
        from agi_bitrix.shared.budget import SharedRateLimiter

        limiter = SharedRateLimiter(settings.storage.url, settings.storage.pbx_id, settings.storage.db_timeout,
                                    settings.storage.state_dir, portal, b24.rate_burst, b24.rate_per_second)
    else:
        limiter = RateLimiter(settings.storage.state_dir, portal, b24.rate_burst, b24.rate_per_second)
    return Bitrix24(auth, timeout=b24.timeout, limiter=limiter, session=http)


def make_auth(settings: Settings, threaded: bool = False) -> Auth:
    b24 = settings.bitrix24
    auth: Auth
    if b24.mode == "webhook":
        auth = WebhookAuth(b24.webhook_url)
    elif b24.mode == "oauth":
        from agi_bitrix.bitrix.oauth import OAuthAuth, TokenStoreError, token_store

        try:
            auth = OAuthAuth(b24, settings.storage.state_dir, threaded=threaded, store=token_store(settings))
        except TokenStoreError as exc:
            raise NotConfigured(str(exc)) from None
    else:
        missing = [key for key in OAUTH_KEYS if not getattr(b24, key)]
        if len(missing) < len(OAUTH_KEYS):
            raise NotConfigured(f"OAuth mode needs [bitrix24] {', '.join(OAUTH_KEYS)}: "
                                f"{', '.join(missing)} empty")
        raise NotConfigured("no Bitrix24 connection configured: set [bitrix24] webhook_url, or "
                            "portal_url, client_id and client_secret of a local application")
    return auth
