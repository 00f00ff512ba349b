"""The widgets' parts in-process: the operator's token cache with a clock the test moves, the
application token check, the error callback, GET refused, the texts and the title's plain text."""
from __future__ import annotations

import re
import secrets

import pytest

from agi_bitrix import settings as settings_mod
from agi_bitrix.deadline import Deadline
from agi_bitrix.placements.app import PlacementApp
from agi_bitrix.placements.identity import Refused, Unavailable, Verifier
from agi_bitrix.placements.texts import language, plain


class Log:
    def __init__(self) -> None:
        self.lines = []

    def info(self, event, **fields):
        self.lines.append(("info", event, fields))

    def error(self, event, **fields):
        self.lines.append(("error", event, fields))


@pytest.fixture
def oauth(pbx, emulator):
    pbx.values["bitrix24"] = {"portal_url": emulator.base_url, "client_id": emulator.client_id,
                              "client_secret": emulator.client_secret, "oauth_url": emulator.oauth_url}
    pbx.values["placements"] = {"public_url": "https://pbx.example.com/agi-bitrix/", "auth_cache": "60", "timeout": "4"}
    pbx.write()
    res = pbx.cli("auth", "--code", emulator.authorization_code())
    assert res.returncode == 0, res.stderr
    return settings_mod.load(str(pbx.settings_file))


def test_a_confirmed_token_is_trusted_briefly_then_asked_again(oauth, emulator):
    now = [1000.0]
    verifier = Verifier(oauth, clock=lambda: now[0])
    boris = emulator.people["102"]
    _, form = emulator.frame_form(boris, "CALL_CARD")
    operator, _ = verifier.operator(form, Deadline(8))
    assert (operator.user_id, operator.name, operator.inner) == (boris, "Boris Test", "102")
    now[0] += 59
    verifier.operator(form, Deadline(8))
    assert len(emulator.requests_for("batch")) == 1
    now[0] += 2  # past [placements] auth_cache: the portal is asked again, and now says no
    emulator.revoke_app()
    with pytest.raises(Refused, match="did not accept"):
        verifier.operator(form, Deadline(8))
    assert len(emulator.requests_for("batch")) == 2


def test_a_known_application_token_must_match(oauth, emulator, pbx):
    from agi_bitrix.bitrix.oauth import TokenStore
    from dataclasses import replace

    store = TokenStore(str(pbx.state_dir))
    store.save(replace(store.load(), application_token=emulator.application_token))
    _, form = emulator.frame_form(emulator.people["102"], "CALL_CARD")
    verifier = Verifier(oauth)
    verifier.operator(form, Deadline(8))
    with pytest.raises(Refused, match="APPLICATION_TOKEN"):
        verifier.operator(dict(form, APPLICATION_TOKEN="forged"), Deadline(8))


def test_webhook_mode_has_no_widgets(pbx, emulator):
    settings = settings_mod.load(str(pbx.settings_file))
    _, form = emulator.frame_form(emulator.people["102"], "CALL_CARD")
    with pytest.raises(Refused, match="local application"):
        Verifier(settings).operator(form, Deadline(8))
    assert emulator.requests_for("batch") == []


def test_error_callback_is_logged_and_get_is_refused(oauth):
    log = Log()
    app = PlacementApp(oauth, log)
    assert app.handle("GET", "/placement/worker", {}).status == 405
    answer = app.handle("POST", "/placement/error", {"error": "ERROR_PLACEMENT_LOADING_OVERTIME"})
    assert answer.status == 200
    assert ("error", "widget_disabled") in [(level, event) for level, event, _ in log.lines]
    assert app.handle("POST", "/placement/nothing", {}).status == 404


def test_texts_follow_the_users_language_and_titles_stay_plain():
    assert (language("ru"), language("kz"), language("en"), language("de"), language(None)) == \
        ("ru", "ru", "en", "en", "en")
    assert plain('<img src=x onerror=alert(1)>\n"x"') == '‹img src=x onerror=alert(1)› "x"'
    assert len(plain("я" * 200)) == 80


def test_made_up_tokens_cannot_spend_the_request_budget(oauth, emulator):
    now = [1000.0]
    verifier = Verifier(oauth, clock=lambda: now[0])
    _, form = emulator.frame_form(emulator.people["102"], "CALL_CARD")
    for _ in range(10):
        with pytest.raises(Refused):
            verifier.operator(dict(form, AUTH_ID=secrets.token_hex(24)), Deadline(8))
    with pytest.raises(Unavailable, match="not asked"):
        verifier.operator(form, Deadline(8))  # even a genuine one waits its turn
    assert len(emulator.requests_for("batch")) == 10
    now[0] += 1.0
    assert verifier.operator(form, Deadline(8))[0].inner == "102"


def test_check_says_widgets_need_the_local_application(pbx, emulator):
    res = pbx.admin("check")
    assert re.search(r"OK +widgets +off \(\[placements\] public_url is empty\)", res.stdout)
    pbx.set("placements", "public_url", "https://pbx.example.com/agi-bitrix/")
    res = pbx.admin("check")
    assert res.returncode == 1 and "[placements] needs the local application (OAuth mode)" in res.stdout


def test_a_token_of_another_application_on_our_portal_is_refused(oauth, emulator):
    emulator.add_application("local.other.app")
    stranger = emulator.issue_tokens(user_id=emulator.people["102"], client_id="local.other.app")
    _, form = emulator.frame_form(emulator.people["102"], "CALL_CARD")
    with pytest.raises(Refused, match="another application"):
        Verifier(oauth).operator(dict(form, AUTH_ID=stranger["access_token"]), Deadline(8))
    assert Verifier(oauth).operator(form, Deadline(8))[0].inner == "102"
