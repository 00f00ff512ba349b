"""`agi-bitrix auth --code | --refresh-token -`: store the OAuth tokens of mode 2.

Prints one line and never a token. The secret is read from standard input (typed without echo,
or piped) or from a file, never taken from the command line, where every user of the machine
sees it in `ps`. The code from the authorization redirect lives 30 seconds, so --code also
takes the whole address the browser was sent to (`...?code=...&domain=...`).
"""
from __future__ import annotations

import getpass
import sys
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from agi_bitrix import settings as settings_mod
from agi_bitrix.commands.check import missing_scopes

# A code lives 30 s, works once and needs client_secret, so the literal form is still taken.
CODE_ON_COMMAND_LINE = ("note: a code on the command line is visible to every user of this machine (ps): "
                        "next time give --code alone and paste it")
TOKEN_ON_COMMAND_LINE = ("a refresh token on the command line is visible to every user of this machine (ps): "
                         "give --refresh-token - and type or pipe it, or --refresh-token-file PATH")


def _fail(text: str, secrets: Any = ()) -> int:
    for secret in secrets:
        text = text.replace(secret, "***")
    print(f"agi-bitrix auth: {text}", file=sys.stderr)
    return 1


def _code_of(value: str) -> str:
    if "code=" not in value:
        return value
    return (parse_qs(urlsplit(value).query).get("code") or [""])[0]


def read_secret(value: Optional[str], path: Optional[str], what: str) -> str:
    """`-`: standard input (a terminal does not echo it); PATH: the file's first line."""
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise OSError(f"cannot read the {what} from {path}: {getattr(exc, 'strerror', None) or exc}") from None
        return (text.strip().splitlines() or [""])[0].strip()
    if value != "-":
        return (value or "").strip()
    if sys.stdin is None or sys.stdin.closed:
        return ""
    if sys.stdin.isatty():
        return getpass.getpass(f"{what}: ").strip()
    return sys.stdin.readline().strip()


def _secrets_of(args: Any) -> tuple:
    """(code, refresh token) from where the arguments say."""
    code_arg, token_arg = getattr(args, "code", None), getattr(args, "refresh_token", None)
    if code_arg not in (None, "-"):
        print(f"agi-bitrix auth: {CODE_ON_COMMAND_LINE}", file=sys.stderr)
    code_file, token_file = getattr(args, "code_file", None), getattr(args, "refresh_token_file", None)
    code = read_secret(code_arg, code_file, "authorization code or address") if (code_arg or code_file) else ""
    token = read_secret(token_arg, token_file, "refresh token") if (token_arg or token_file) else ""
    return _code_of(code), token


def run(args: Any) -> int:
    from agi_bitrix.bitrix.errors import BitrixError
    from agi_bitrix.bitrix.oauth import authorize, token_store

    if getattr(args, "refresh_token", None) not in (None, "-"):
        print(f"agi-bitrix auth: {TOKEN_ON_COMMAND_LINE}", file=sys.stderr)
        return 2
    try:
        settings = settings_mod.load(getattr(args, "settings", None))
    except settings_mod.SettingsError as exc:
        return _fail(str(exc))
    b24 = settings.bitrix24
    missing = [key for key in settings_mod.OAUTH_KEYS if not getattr(b24, key)]
    if missing:
        return _fail(f"set [bitrix24] {', '.join(missing)} of the local application first")
    try:
        code, refresh = _secrets_of(args)
    except OSError as exc:
        return _fail(str(exc))
    except (EOFError, KeyboardInterrupt):
        return _fail("nothing read")
    secrets = [s for s in (code, refresh, *settings.secrets()) if s]
    if not (code or refresh):
        return _fail("no code or refresh token was read (give --code and paste it, or pipe a refresh "
                     "token into --refresh-token -)")
    try:
        tokens = authorize(b24, settings.storage.state_dir, code=code or None, refresh_token=refresh or None,
                           store=token_store(settings))
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
        # Click-to-call needs its events bound to this application (Bitrix24 REST docs: event.bind).
        from agi_bitrix.bitrix.factory import make_client
        from agi_bitrix.events import bind_events
        from agi_bitrix.placements.bind import bind_summary

        try:
            notes.append(f"events bound ({settings.events.delivery}): {', '.join(bind_events(make_client(settings), settings))}")
        except Exception as exc:
            notes.append(f"click-to-call events not bound: {exc}")
        notes.append(f"widgets: {bind_summary(make_client(settings), settings)}")
    until = time.strftime("%H:%M", time.localtime(tokens.expires))
    print(f"OAuth tokens stored in {token_store(settings).path} for "
          f"{urlsplit(tokens.client_endpoint).netloc} (member_id {tokens.member_id or '?'}), "
          f"access token valid until {until}" + (f"; note: {'; '.join(notes)}" if notes else ""))
    return 0
