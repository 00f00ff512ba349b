"""Who we are to the portal. The client asks an auth object for the base URL and parameters,
and tells it when the portal refused the access token.

Mode 1, webhook: the secret sits in the URL path. Mode 2, OAuth local application: oauth.py.
"""
from __future__ import annotations

from typing import Dict, Optional, Protocol, Tuple

from agi_bitrix.deadline import Deadline


class Auth(Protocol):
    mode: str

    def credentials(self) -> Tuple[str, Dict[str, str]]:
        """Base URL that ends in '/' (the method name is appended) and extra body parameters."""

    def on_expired(self, used: Dict[str, str], deadline: Optional[Deadline] = None) -> bool:
        """The portal answered expired_token for `used`; return True when retrying makes sense."""

    def on_rejected(self, used: Dict[str, str], deadline: Optional[Deadline] = None) -> bool:
        """The portal answered invalid_token for `used`; True when newer credentials exist."""


class WebhookAuth:
    mode = "webhook"

    def __init__(self, webhook_url: str) -> None:
        self.base = webhook_url if webhook_url.endswith("/") else webhook_url + "/"

    def credentials(self) -> Tuple[str, Dict[str, str]]:
        return self.base, {}

    def on_expired(self, used: Dict[str, str], deadline: Optional[Deadline] = None) -> bool:
        return False  # a webhook never expires by token; nothing to refresh

    def on_rejected(self, used: Dict[str, str], deadline: Optional[Deadline] = None) -> bool:
        return False
