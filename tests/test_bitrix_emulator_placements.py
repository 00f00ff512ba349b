"""The emulator's widget side is strict: placement.bind/unbind/get and user.current as the Bitrix24
REST docs describe them (application context, administrators, per-placement rules)."""
from __future__ import annotations

import pytest
import requests

from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from conftest import webhook_call

WORKER = {"PLACEMENT": "PAGE_BACKGROUND_WORKER", "HANDLER": "https://pbx.example.com/placement/worker",
          "OPTIONS": {"errorHandlerUrl": "https://pbx.example.com/placement/error"}}
CARD = {"PLACEMENT": "CALL_CARD", "HANDLER": "https://pbx.example.com/placement/card", "TITLE": "Client and task"}


def app_call(emu: Bitrix24Emulator, method: str, params: dict, token: str) -> dict:
    return requests.post(emu.client_endpoint + method, json=dict(params, auth=token), timeout=5).json()


@pytest.fixture
def admin(emulator) -> str:
    return emulator.issue_tokens()["access_token"]


def test_bind_get_unbind_in_the_application_context(emulator, admin):
    assert app_call(emulator, "placement.bind", WORKER, admin)["result"] is True
    assert app_call(emulator, "placement.bind", CARD, admin)["result"] is True
    rows = app_call(emulator, "placement.get", {}, admin)["result"]
    assert [(r["placement"], r["handler"], r["options"]) for r in rows] == [
        ("PAGE_BACKGROUND_WORKER", WORKER["HANDLER"], WORKER["OPTIONS"]),
        ("CALL_CARD", CARD["HANDLER"], [])]  # CALL_CARD keeps no OPTIONS
    assert app_call(emulator, "placement.unbind", {"PLACEMENT": "CALL_CARD"}, admin)["result"] == {"count": 2}
    assert [r["placement"] for r in emulator.placements] == ["PAGE_BACKGROUND_WORKER"]


@pytest.mark.parametrize("params,error", [
    (dict(WORKER, OPTIONS={}), "EMPTY_ERROR_HANDLER_URL"),
    (dict(CARD, USER_ID=2), "ERROR_PLACEMENT_USER_MODE"),
    (dict(CARD, HANDLER="http://localhost/card"), "ERROR_WRONG_HANDLER_URL"),
    (dict(CARD, HANDLER="ftp://pbx.example.com/card"), "ERROR_UNSUPPORTED_PROTOCOL"),
    (dict(CARD, HANDLER=""), "ERROR_ARGUMENT"),
    (dict(CARD, PLACEMENT="CALL_CARD_X"), "ERROR_PLACEMENT_NOT_FOUND"),
])
def test_bind_refuses_what_the_portal_refuses(emulator, admin, params, error):
    assert app_call(emulator, "placement.bind", params, admin)["error"] == error
    assert emulator.placements == []


def test_one_background_worker_and_no_duplicate_tab(emulator, admin):
    app_call(emulator, "placement.bind", WORKER, admin)
    again = dict(WORKER, HANDLER="https://pbx.example.com/other")
    assert app_call(emulator, "placement.bind", again, admin)["error"] == "ERROR_PLACEMENT_MAX_COUNT"
    app_call(emulator, "placement.bind", CARD, admin)
    assert "already binded" in app_call(emulator, "placement.bind", CARD, admin)["error_description"]


def test_webhooks_and_ordinary_employees_cannot_bind(emulator):
    assert webhook_call(emulator, "placement.bind", CARD).json()["error"] == "WRONG_AUTH_TYPE"
    _, frame = emulator.frame_form(emulator.people["102"], "CALL_CARD")
    assert app_call(emulator, "placement.bind", CARD, frame["AUTH_ID"])["error"] == "ACCESS_DENIED"
    emulator.scopes.remove("telephony")
    admin = emulator.issue_tokens()["access_token"]
    assert app_call(emulator, "placement.bind", CARD, admin)["error"] == "ERROR_PLACEMENT_NOT_FOUND"


def test_user_current_answers_the_tokens_own_employee(emulator):
    query, frame = emulator.frame_form(emulator.people["102"], "CALL_CARD", {"CALL_ID": "externalCall.x.1"}, lang="en")
    me = app_call(emulator, "user.current", {}, frame["AUTH_ID"])["result"]
    assert me["ID"] == str(emulator.people["102"]) and me["UF_PHONE_INNER"] == "102"
    assert frame["member_id"] == emulator.member_id and frame["APPLICATION_TOKEN"] == emulator.application_token
    assert query["LANG"] == "en" and query["DOMAIN"] == emulator.domain
    assert app_call(emulator, "user.current", {}, "f" * 48)["error"] == "invalid_token"
    emulator.revoke_app()
    assert emulator.placements == []
