"""`agi-bitrix auth --code CODE | --refresh-token TOKEN`: store the OAuth tokens of mode 2.

Prints one line and never a token. The code from the authorization redirect lives 30 seconds,
so --code also takes the whole address the browser was sent to (`...?code=...&domain=...`).
"""
from __future__ import annotations

import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agi_bitrix import settings as settings_mod
from agi_bitrix.commands.check import missing_scopes


def _fail(text: str, secrets: Any = ()) -> int:
    for secret in secrets:
        text = text.replace(secret, "***")
    print(f"agi-bitrix auth: {text}", file=sys.stderr)
    return 1


def _code_of(value: str) -> str:
    if "code=" not in value:
        return value
    return (parse_qs(urlsplit(value).query).get("code") or [""])[0]


def run(args: Any) -> int:
    from agi_bitrix.bitrix.errors import BitrixError
    from agi_bitrix.bitrix.oauth import TokenStore, authorize

    try:
        settings = settings_mod.load(getattr(args, "settings", None))
    except settings_mod.SettingsError as exc:
        return _fail(str(exc))
    b24 = settings.bitrix24
    missing = [key for key in settings_mod.OAUTH_KEYS if not getattr(b24, key)]
    if missing:
        return _fail(f"set [bitrix24] {', '.join(missing)} of the local application first")
    code, refresh = getattr(args, "code", None), getattr(args, "refresh_token", None)
    code, refresh = _code_of((code or "").strip()), (refresh or "").strip()
    secrets = [s for s in (code, refresh, *settings.secrets()) if s]
    if not (code or refresh):
        return _fail("give --code CODE or --refresh-token TOKEN")
    try:
        tokens = authorize(b24, settings.storage.state_dir, code=code or None, refresh_token=refresh or None)
    except BitrixError as exc:
        return _fail(exc.description or exc.summary(), secrets)
    except OSError as exc:
        return _fail(f"cannot store the tokens in {settings.storage.state_dir}: {exc.strerror or exc}", secrets)
    lacking = missing_scopes(tokens.scopes())
    notes = []
    if lacking:
        notes.append(f"the application lacks scope(s) {', '.join(lacking)}")
    if b24.mode == "webhook":
        notes.append("webhook_url is set, so the webhook stays in use until you empty it")
    else:
        # Click-to-call needs its events bound to this application (reference §5.7).
        from agi_bitrix.bitrix.factory import make_client
        from agi_bitrix.events import bind_events

        try:
            notes.append(f"events bound ({settings.events.delivery}): {', '.join(bind_events(make_client(settings), settings))}")
        except Exception as exc:
            notes.append(f"click-to-call events not bound: {exc}")
    until = time.strftime("%H:%M", time.localtime(tokens.expires))
    print(f"OAuth tokens stored in {TokenStore(settings.storage.state_dir).path} for "
          f"{urlsplit(tokens.client_endpoint).netloc} (member_id {tokens.member_id or '?'}), "
          f"access token valid until {until}" + (f"; note: {'; '.join(notes)}" if notes else ""))
    return 0
