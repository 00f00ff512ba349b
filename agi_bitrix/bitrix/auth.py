"""Who we are to the portal. The client asks an auth object for the base URL and parameters,
and tells it when the portal says the access token expired.

Mode 1, webhook: the secret sits in the URL path. Mode 2, OAuth local application: see oauth.py
(the next step; the seam is `Auth`).
"""
from __future__ import annotations

from typing import Dict, Protocol, Tuple


class Auth(Protocol):
    mode: str

    def credentials(self) -> Tuple[str, Dict[str, str]]:
        """Base URL that ends in '/' (the method name is appended) and extra body parameters."""

    def on_expired(self, used: Dict[str, str]) -> bool:
        """The portal answered expired_token for `used`; return True when retrying makes sense."""


class WebhookAuth:
    mode = "webhook"

    def __init__(self, webhook_url: str) -> None:
        self.base = webhook_url if webhook_url.endswith("/") else webhook_url + "/"

    def credentials(self) -> Tuple[str, Dict[str, str]]:
        return self.base, {}

    def on_expired(self, used: Dict[str, str]) -> bool:
        return False  # a webhook never expires by token; nothing to refresh
