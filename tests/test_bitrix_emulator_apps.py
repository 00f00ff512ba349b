"""The emulator's applications: app.info and user.admin answer for the token's application and user;
a token works only for the application it was issued to, as on a real portal."""
from __future__ import annotations

import requests

from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from conftest import webhook_call


def oauth_call(emu: Bitrix24Emulator, method: str, token: str) -> requests.Response:
    return requests.post(emu.client_endpoint + method, json={"auth": token}, timeout=5)


def test_app_info_names_the_tokens_application(emulator):
    ours = emulator.issue_tokens()
    emulator.add_application("local.other.app", "other-secret")
    other = emulator.issue_tokens(client_id="local.other.app")
    assert oauth_call(emulator, "app.info", ours["access_token"]).json()["result"]["CODE"] == emulator.client_id
    info = oauth_call(emulator, "app.info", other["access_token"]).json()["result"]
    assert info["CODE"] == "local.other.app" and info["INSTALLED"] is True and info["STATUS"] == "L"


def test_app_info_needs_an_application_context(emulator):
    answer = webhook_call(emulator, "app.info")
    assert answer.status_code == 400 and answer.json()["error"] == "ACCESS_DENIED"


def test_user_admin_is_true_only_for_an_administrator(emulator):
    admin = emulator.issue_tokens()  # the installing administrator
    employee = emulator.issue_tokens(user_id=emulator.people["102"])
    assert oauth_call(emulator, "user.admin", admin["access_token"]).json()["result"] is True
    assert oauth_call(emulator, "user.admin", employee["access_token"]).json()["result"] is False


def test_a_refresh_token_works_only_for_its_own_application(emulator):
    emulator.add_application("local.other.app", "other-secret")
    other = emulator.issue_tokens(client_id="local.other.app")
    refused = requests.get(emulator.oauth_url, params={
        "grant_type": "refresh_token", "client_id": emulator.client_id, "client_secret": emulator.client_secret,
        "refresh_token": other["refresh_token"]}, timeout=5)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    renewed = requests.get(emulator.oauth_url, params={
        "grant_type": "refresh_token", "client_id": "local.other.app", "client_secret": "other-secret",
        "refresh_token": other["refresh_token"]}, timeout=5)
    assert renewed.status_code == 200
    token = renewed.json()["access_token"]
    assert oauth_call(emulator, "app.info", token).json()["result"]["CODE"] == "local.other.app"


def test_revoking_our_application_leaves_another_ones_tokens(emulator):
    emulator.add_application("local.other.app", "other-secret")
    other = emulator.issue_tokens(client_id="local.other.app")
    ours = emulator.issue_tokens()
    emulator.revoke_app()
    assert oauth_call(emulator, "app.info", ours["access_token"]).json()["error"] == "invalid_token"
    assert oauth_call(emulator, "app.info", other["access_token"]).status_code == 200
