"""The one place that turns settings into a ready Bitrix24 client (webhook or OAuth)."""
from __future__ import annotations

from agi_bitrix.bitrix.auth import WebhookAuth
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.settings import Settings


class NotConfigured(Exception):
    """No usable Bitrix24 connection in the settings; the message says what to set."""


def make_client(settings: Settings) -> Bitrix24:
    b24 = settings.bitrix24
    if b24.mode == "webhook":
        return Bitrix24(WebhookAuth(b24.webhook_url), timeout=b24.timeout)
    if b24.mode == "oauth":
        raise NotConfigured("OAuth mode is not available yet: set [bitrix24] webhook_url")
    raise NotConfigured("no Bitrix24 connection configured: set [bitrix24] webhook_url")
