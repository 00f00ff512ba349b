"""The application's installation callback (ONAPPINSTALL, ONAPPUPDATE): proven before it is stored.

Whoever has seen one page or event of the portal knows its domain and member_id, so these prove
nothing; a forged callback that got stored would make the forger's events authentic (calls
dialed on his word) and could send our calls to his server. A callback is stored only when:

- it names the configured portal (auth[domain], auth[client_endpoint]) and an OAuth server we
  already trust (auth[server_endpoint]: the one in `oauth_url` or the one our tokens use), since
  the OAuth server gets client_secret at every renewal. The tokens are then stored with the
  configured portal's address, never an address the callback names;
- its access token works on the configured portal, asked at the address in the settings;
- the token belongs to our application: `app.info` answers our client_id as CODE (Bitrix24 REST
  docs: app.info; a local application's form shows its client_id as "Application code");
- the token's user may manage applications (`user.admin`): only such a user installs one, while
  any employee who opens a page of the application gets a token of it.

A reinstall that replaces a working pair takes the same proof. Each proof costs one request to
the portal, so failed ones are rationed: a flood of forged callbacks cannot spend the portal's
request budget that the calls need.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import urlsplit

from agi_bitrix.allowance import Allowance
from agi_bitrix.bitrix.client import Bitrix24
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.bitrix.oauth import Tokens
from agi_bitrix.settings import Bitrix24Settings

PROOF_TIMEOUT = 5.0    # seconds for the one batch request of a proof (within serve's request_timeout)
PROOF_BURST = 3        # proofs in a row; then one more every PROOF_EVERY seconds
PROOF_EVERY = 5.0


class InstallRefused(Exception):
    """The callback does not prove it comes from our portal and application; nothing is stored."""


class InstallBusy(InstallRefused):
    """Too many callbacks to prove just now (a flood): refused without asking the portal."""


class OneToken:
    """One given access token at the configured portal: no renewal, no other address (the
    installation callback's here, a widget frame's in placements/identity.py)."""

    mode = "oauth"

    def __init__(self, endpoint: str, token: str) -> None:
        self.endpoint, self.token = endpoint, token

    def credentials(self) -> Tuple[str, Dict[str, str]]:
        return self.endpoint, {"auth": self.token}

    def on_expired(self, used: Dict[str, str], deadline: Any = None) -> bool:
        return False

    def on_rejected(self, used: Dict[str, str], deadline: Any = None) -> bool:
        return False


class ProofGate:
    """A small bucket of proofs: PROOF_BURST at once, refilled one per PROOF_EVERY seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.allowance = Allowance(PROOF_BURST, 1.0 / PROOF_EVERY, clock)

    def take(self) -> None:
        if not self.allowance.take():
            raise InstallBusy("too many installation callbacks to check: refused without asking "
                              "the portal (try the installation again in a minute)")


def _host(url: str) -> str:
    return urlsplit(url).netloc.lower()


def _text(auth: Dict[str, Any], key: str) -> str:
    value = auth.get(key)
    return value if isinstance(value, str) else ""


def check_addresses(b24: Bitrix24Settings, auth: Dict[str, Any], previous: Optional[Tokens]) -> str:
    """The cheap checks, before anything is asked: returns the OAuth server address to keep."""
    portal = _host(b24.portal_url)
    domain = _text(auth, "domain")
    if domain.lower() != portal:
        raise InstallRefused(f"installation callback for another portal ({domain[:60]!r}, ours is {portal})")
    if previous is not None and previous.member_id and _text(auth, "member_id") != previous.member_id:
        raise InstallRefused("installation callback from a foreign portal (member_id)")
    client_endpoint = _text(auth, "client_endpoint")
    if client_endpoint and (_host(client_endpoint) != portal
                            or urlsplit(client_endpoint).scheme != urlsplit(b24.portal_url).scheme):
        raise InstallRefused(f"installation callback names another REST address ({client_endpoint[:80]!r}) "
                             f"than the portal in [bitrix24] portal_url")
    server_endpoint = _text(auth, "server_endpoint")
    trusted = {_host(b24.oauth_url)} | ({_host(previous.server_endpoint)} if previous and
                                       previous.server_endpoint else set())
    if server_endpoint and _host(server_endpoint) not in trusted:
        raise InstallRefused(f"installation callback names the OAuth server {_host(server_endpoint)[:60]!r}, "
                             f"not the one in [bitrix24] oauth_url: if it is your portal's, set oauth_url = "
                             f"https://{_host(server_endpoint)[:60]}/oauth/token/")
    if not (_text(auth, "access_token") and _text(auth, "refresh_token")):
        raise InstallRefused("installation callback without the installing administrator's tokens: "
                             "nothing proves it (install the application again)")
    if not _text(auth, "application_token"):
        raise InstallRefused("installation callback without an application_token")
    return server_endpoint or (previous.server_endpoint if previous else "")


def prove(b24: Bitrix24Settings, access_token: str) -> None:
    """Ask the configured portal, with the callback's token, whose application and user it is."""
    client = Bitrix24(OneToken(b24.portal_url + "rest/", access_token), timeout=PROOF_TIMEOUT)
    portal = _host(b24.portal_url)
    try:
        answer = client.batch({"app": ("app.info", {}), "admin": ("user.admin", {})})
    except BitrixError as exc:
        raise InstallRefused(f"its token does not work on {portal}: {exc.summary()}") from None
    for key, method in (("app", "app.info"), ("admin", "user.admin")):
        error = answer.error(key, method)
        if error is not None:
            raise InstallRefused(f"its token does not work on {portal}: {error.summary()}")
    app = answer.results.get("app")
    code = str(app.get("CODE") or "") if isinstance(app, dict) else ""
    if code != b24.client_id:
        raise InstallRefused(f"its token belongs to another application ({code[:60]!r}), "
                             f"not to [bitrix24] client_id")
    if answer.results.get("admin") is not True:
        raise InstallRefused("its token is not of a user who may install applications (user.admin)")


def accept(b24: Bitrix24Settings, auth: Any, previous: Optional[Tokens], gate: ProofGate) -> Tokens:
    """The tokens and application_token of a proven callback, ready to store; else InstallRefused."""
    if not isinstance(auth, dict):
        raise InstallRefused("installation callback without auth")
    server_endpoint = check_addresses(b24, auth, previous)
    gate.take()
    prove(b24, _text(auth, "access_token"))
    endpoint = b24.portal_url + "rest/"
    grant = dict(auth, client_endpoint=endpoint, server_endpoint=server_endpoint)
    return replace(Tokens.from_grant(grant, endpoint), application_token=_text(auth, "application_token"))
