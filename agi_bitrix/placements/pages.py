"""The widget pages: Jinja2 templates shipped in the package, autoescaped, so a client called
`<img src=x onerror=alert(1)>` or a task title with quotes is shown as text."""
from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any, Dict, Optional
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, select_autoescape

from agi_bitrix.placements.texts import words

_ENV = Environment(loader=PackageLoader("agi_bitrix.placements", "templates"),
                   autoescape=select_autoescape(default=True, default_for_string=True))


# Times as the operator reads them: in [dialer] timezone (the PBX itself may run on UTC).
def _when(ts: Optional[float], zone: str) -> str:
    return datetime.fromtimestamp(ts, ZoneInfo(zone)).strftime("%d.%m.%Y %H:%M") if ts else ""


def _deadline(value: Any, zone: str) -> str:
    try:
        return datetime.fromisoformat(str(value)).astimezone(ZoneInfo(zone)).strftime("%d.%m.%Y %H:%M")
    except ValueError:
        return str(value or "")


_ENV.filters.update(when=_when, deadline=_deadline)


def csp(nonce: str, library: str) -> str:
    """Only our own inline script (by nonce) and the BX24 library run, whatever a page contains."""
    from urllib.parse import urlsplit

    origin = "{0.scheme}://{0.netloc}".format(urlsplit(library))
    return (f"default-src 'none'; script-src 'nonce-{nonce}' {origin}; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'")


def render(template: str, lang: str, **values: Any) -> Dict[str, Any]:
    """The page and the nonce its Content-Security-Policy must name."""
    nonce = secrets.token_urlsafe(16)
    body = _ENV.get_template(template).render(t=words(lang), lang=lang, nonce=nonce, **values)
    return {"body": body.encode("utf-8"), "nonce": nonce}
