"""The call-card widgets in a real browser: headless Chromium (the system's, driven by Playwright)
opens the pages `agi-bitrix service` gives Bitrix24 (serve's handler on its HTTP port), inside a
stand-in portal page that plays the call card (agi_bitrix/testing/call_card.py). The dialer call
comes from the real dialer (`dialer run`, the fake AMI, the dialplan's AGI steps), the portal is
the Bitrix24 emulator (OAuth application)."""
from __future__ import annotations

import os
import re
import secrets
import threading
import time
from pathlib import Path

import pytest
import requests

from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from agi_bitrix.testing.call_card import Browser, card_commands, portal_page
from agi_bitrix.testing.fake_ami import FakeAMI, OriginateOutcome, originate_variables
from test_click2call import Desk as ClickDesk
from test_dialer import CallCenter

HOSTILE = "<img src=x onerror=alert(1)>"
SHOT = os.environ.get("AGI_BITRIX_SCREENSHOT")  # where to save the tab's picture (README)


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """One Chromium for the worker's whole run: xdist may hand it these tests in more than one batch."""
    try:
        chromium = Browser(tmp_path_factory.mktemp("chromium-profile"))
    except ImportError as exc:
        pytest.fail(f"the widget tests need playwright (pip install -e '.[test]'): {exc}")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield chromium
    chromium.close()


class Center(CallCenter):
    """The call center with its pages served by the service (serve's handler, on the service's HTTP
    port), the app installed, and calls kept up while a card is open."""

    def __init__(self, pbx, emulator, ami, placements_timeout: str) -> None:
        super().__init__(pbx, emulator, ami)
        dialer = dict(pbx.values["dialer"])
        self.desk = ClickDesk(pbx, emulator, ami, "online")  # OAuth settings, events
        pbx.values["dialer"] = dialer
        ami.on_originate(self._decide)
        listen = "127.0.0.1:%d" % pbx.service.web.server_address[1]
        self.url = f"http://{listen}/"
        pbx.values["events"].update(listen=listen, handler_url=self.url)
        pbx.values["placements"] = {"public_url": self.url, "timeout": placements_timeout}
        pbx.write()
        self.hangup = threading.Event()

    def _decide(self, action) -> OriginateOutcome:
        return OriginateOutcome(reason=4, on_answer=lambda: self.talk(action))

    def talk(self, action) -> None:
        """The client answered; the operator's phone rings and his card pops up until the test hangs up."""
        lid = action.get("ChannelId")
        variables = dict(originate_variables(action))
        self.pbx.run(["dialer-answered"], linkedid=lid, uniqueid=lid, context="bitrix-dialer", extension="client",
                     variables=variables, channel=action.get("Channel") + "-0001")
        self.hangup.wait(60)
        self.pbx.run(["hangup", "NOANSWER", ""], linkedid=lid, dead=True, variables=variables)

    def dial(self, title: str, phone: str, name: str = "") -> dict:
        """One dialer attempt up to the operator's card; returns the call as Bitrix24 registered it."""
        contact = self.emu.add_contact(name or title, [phone], assigned_by_id=self.anna)
        task = self.emu.add_task(title, self.boris, group_id=int(self.group["ID"]),
                                 deadline="2026-01-10T18:00:00+03:00", crm=[f"C_{contact['ID']}"])
        before = set(self.emu.calls)
        res = self.pbx.cli("dialer", "run", "--once")
        assert res.returncode == 0, res.stdout + res.stderr
        end = time.time() + 20
        while time.time() < end:
            new = [c for c in self.emu.calls.values() if c["CALL_ID"] not in before]
            if new:
                return dict(new[0], task_id=int(task["ID"]))
            time.sleep(0.05)
        raise AssertionError(f"the dialer call was not registered; log: {self.pbx.log()[-3:]}")

    def frame(self, user: int, placement: str, options: dict = None, lang: str = "ru", **changes):
        query, body = self.emu.frame_form(user, placement, options, lang=lang)
        body.update(changes)
        path = "placement/worker" if placement == "PAGE_BACKGROUND_WORKER" else "placement/card"
        return self.url + path, query, body


@pytest.fixture
def placements_timeout() -> str:
    """[placements] timeout: what a loaded test machine needs for serve's questions to the portal."""
    return "4"


@pytest.fixture
def center(service_pbx, emulator, placements_timeout):
    """The service in this process serves the pages and the dialer call's steps; the dialer and the
    other commands run as processes (`serve` itself as a process: test_serve_security, test_click2call)."""
    with FakeAMI(username="crm", secret="ami-secret-3") as ami:
        c = Center(service_pbx, emulator, ami, placements_timeout)
        assert emulator.install_app(c.url) == 200
        yield c
        c.hangup.set()
        c.wait_calls(5)


def open_worker(browser, center, user, card_data, **changes):
    action, query, body = center.frame(user, "PAGE_BACKGROUND_WORKER", {"ID": "PAGE_BACKGROUND_WORKER"}, **changes)
    page = browser.open(portal_page(action, query, body))
    state = browser.wait_state(page, {"waiting", "refused", "unavailable"})
    if state == "waiting":
        page.evaluate("data => window.openCard(data)", card_data)
        state = browser.wait_state(page, {"highlighted", "ordinary", "unavailable", "refused"})
    return page, state


def initialized(call: dict) -> dict:
    """BackgroundCallCard::initialized data as the card passes it (typed, like getStatus)."""
    return {"CALL_ID": call["CALL_ID"], "PHONE_NUMBER": call["register"]["PHONE_NUMBER"], "LINE_NUMBER": "autodialer",
            "LINE_NAME": "Автообзвон", "CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": 1, "CALL_DIRECTION": "incoming",
            "CALL_STATE": "connecting", "CALL_LIST_MODE": False}


def test_widgets_bound_by_install_and_auth_rebound_on_reinstall_and_shown_by_check(center, emulator):
    bound = {p["placement"]: p for p in emulator.placements}
    assert bound["PAGE_BACKGROUND_WORKER"]["handler"] == center.url + "placement/worker"
    assert bound["PAGE_BACKGROUND_WORKER"]["options"] == {"errorHandlerUrl": center.url + "placement/error"}
    assert bound["CALL_CARD"]["handler"] == center.url + "placement/card"
    assert bound["CALL_CARD"]["langAll"]["en"]["TITLE"] == "Client and task"
    check = center.pbx.cli("check")
    assert f"PAGE_BACKGROUND_WORKER bound to {center.url}placement/worker" in check.stdout
    assert f"CALL_CARD bound to {center.url}placement/card" in check.stdout
    # Reinstalling drops the application's widgets; the install callback binds them again.
    assert emulator.install_app(center.url) == 200
    assert sorted(p["placement"] for p in emulator.placements) == ["CALL_CARD", "PAGE_BACKGROUND_WORKER"]
    # A new public address: `auth` re-binds (unbind first: a second worker bind is refused).
    center.pbx.values["placements"]["public_url"] = "http://127.0.0.1:9/moved/"
    center.pbx.write()
    check = center.pbx.cli("check")
    assert check.returncode == 1 and f"PAGE_BACKGROUND_WORKER points to {center.url}placement/worker" in check.stdout
    res = center.pbx.cli("auth", "--code", emulator.authorization_code())
    assert res.returncode == 0 and "widgets: PAGE_BACKGROUND_WORKER, CALL_CARD" in res.stdout, res.stderr
    assert {p["handler"] for p in emulator.placements} == {"http://127.0.0.1:9/moved/placement/worker",
                                                          "http://127.0.0.1:9/moved/placement/card"}


def test_dialer_call_gets_the_title_and_status_text(browser, center, emulator):
    call = center.dial("Позвонить клиенту", "+7 916 555-44-33", "Ivan Petrov")
    page, state = open_worker(browser, center, center.boris, initialized(call))
    assert state == "highlighted"
    page.wait_for_function("() => window.card.commands.length >= 2")
    commands = dict((name, params) for name, params in card_commands(page))
    assert commands["CallCardSetCardTitle"] == {"title": f"АВТООБЗВОН · Задача #{call['task_id']} «Позвонить клиенту»"}
    assert re.fullmatch(r"попытка 1 из 3 · у клиента \d\d:\d\d", commands["CallCardSetStatusText"]["statusText"])
    assert page.evaluate("() => window.card.bound") == ["BackgroundCallCard::initialized"]
    assert browser.library_loads >= 1
    # The frame's token was checked once with the portal, then trusted briefly (the cache).
    assert len(emulator.requests_for("user.current")) == 1
    page.close()


def test_english_texts_by_the_users_language(browser, center, emulator):
    call = center.dial("Call the client", "+7 916 555-44-34")
    page, state = open_worker(browser, center, center.boris, initialized(call), LANG="en")
    assert state == "highlighted"
    page.wait_for_function("() => window.card.commands.length >= 2")
    commands = dict(card_commands(page))
    assert commands["CallCardSetCardTitle"]["title"] == f"AUTO-DIALER · Task #{call['task_id']} “Call the client”"
    assert commands["CallCardSetStatusText"]["statusText"].startswith("attempt 1 of 3 · client's time ")
    page.close()


def test_ordinary_call_and_another_operators_call_get_nothing(browser, center, emulator):
    run = center.pbx.run(["incoming", "+79161234567", "74951234567"], linkedid="1795400000.1",
                         channel="PJSIP/provider-00000001")
    call_id = run.set_variables["BITRIX_CALL_ID"]
    page, state = open_worker(browser, center, center.anna, {"CALL_ID": call_id, "PHONE_NUMBER": "+79161234567",
                                                             "CALL_DIRECTION": "incoming"})
    assert state == "ordinary" and card_commands(page) == []
    page.close()
    # Boris's dialer call, but Vera's browser: she learns nothing about it.
    dialer_call = center.dial("Чужая задача", "+7 916 555-44-35")
    page, state = open_worker(browser, center, emulator.people["103"], initialized(dialer_call))
    assert state == "ordinary" and card_commands(page) == []
    page.close()
    action, query, body = center.frame(emulator.people["103"], "CALL_CARD", {"CALL_ID": dialer_call["CALL_ID"]})
    tab = requests.post(action, params=query, data=body, timeout=10)
    assert tab.status_code == 200 and 'data-agi-state="unknown"' in tab.text and "Чужая задача" not in tab.text


def test_tab_shows_the_task_its_attempts_and_the_clients_time(browser, center, emulator):
    call = center.dial("Позвонить клиенту", "+7 916 555-44-36", "Ivan Petrov")
    options = {"CALL_ID": call["CALL_ID"], "PHONE_NUMBER": "+79165554436", "CALL_DIRECTION": "incoming",
               "CALL_STATE": "connected", "CALL_LIST_MODE": "false", "CRM_ENTITY_TYPE": "CONTACT"}
    _, _, worker = center.frame(center.boris, "PAGE_BACKGROUND_WORKER")
    mark = requests.post(center.url + "placement/lookup", data=dict(worker, LANG="ru", **options), timeout=10).json()
    action, query, body = center.frame(center.boris, "CALL_CARD", options)
    page = browser.open(portal_page(action, query, body, card_title=mark["title"], card_status=mark["status"],
                                    tabs="CRM · <b>Клиент и задача</b>", height=300))
    assert browser.wait_state(page, {"dialer", "unavailable", "refused", "unknown"}) == "dialer"
    tab = browser.widget(page)
    link = tab.locator("#task a")
    assert link.inner_text() == f"#{call['task_id']} «Позвонить клиенту»"
    assert link.get_attribute("href").endswith(f"/tasks/task/view/{call['task_id']}/")
    assert tab.locator("#client").inner_text() == "Ivan Petrov · +79165554436"
    assert tab.locator("#responsible").inner_text() == "Boris Test"
    assert tab.locator("#attempt").inner_text() == "1 из 3"
    assert tab.locator("#deadline").inner_text() == "10.01.2026 18:00"  # in [dialer] timezone
    assert re.fullmatch(r"\d\d:\d\d \(MSK\)", tab.locator("#client-time").inner_text())
    rows = tab.locator("#attempts tr").all_inner_texts()
    assert len(rows) == 2 and "идёт сейчас" in rows[1] and "Boris Test" in rows[1]
    if SHOT:
        Path(SHOT).parent.mkdir(parents=True, exist_ok=True)
        page.locator(".card").screenshot(path=SHOT)
    page.close()


def test_tab_of_an_ordinary_call_names_the_manager_and_the_last_calls(browser, center, emulator):
    for n, status in ((1, "NOANSWER"), (2, "ANSWER")):
        lid = f"1795500000.{n}"
        center.pbx.run(["incoming", "+79161234567", "74951234567"], linkedid=lid, channel="PJSIP/provider-0001")
        center.pbx.run(["hangup", status, "7" if status == "ANSWER" else ""], linkedid=lid, dead=True)
    run = center.pbx.run(["incoming", "+79161234567", "74951234567"], linkedid="1795500000.3",
                         channel="PJSIP/provider-0003")
    options = {"CALL_ID": run.set_variables["BITRIX_CALL_ID"], "PHONE_NUMBER": "+79161234567",
               "CALL_DIRECTION": "incoming", "CRM_ENTITY_TYPE": "CONTACT"}
    action, query, body = center.frame(center.anna, "CALL_CARD", options, lang="en")
    page = browser.open(portal_page(action, query, body, height=260))
    assert browser.wait_state(page, {"ordinary", "unavailable", "refused", "unknown"}) == "ordinary"
    tab = browser.widget(page)
    assert tab.locator("#manager").inner_text() == "Boris Test (102)"
    rows = tab.locator("#last-calls tr").all_inner_texts()
    assert len(rows) == 3 and "talked" in rows[1] and "not answered" in rows[2]
    page.close()


def test_hostile_names_are_shown_as_text(browser, center, emulator):
    title = f'Позвонить "{HOSTILE}" \'сегодня\''
    call = center.dial(title, "+7 916 555-44-37", HOSTILE)
    options = {"CALL_ID": call["CALL_ID"], "PHONE_NUMBER": "+79165554437", "CALL_DIRECTION": "incoming"}
    action, query, body = center.frame(center.boris, "CALL_CARD", options)
    page = browser.open(portal_page(action, query, body, height=330))
    assert browser.wait_state(page, {"dialer", "unavailable", "refused", "unknown"}) == "dialer"
    tab = browser.widget(page)
    assert tab.locator("#task a").inner_text() == f"#{call['task_id']} «{title}»"
    assert tab.locator("#client").inner_text() == f"{HOSTILE} · +79165554437"
    assert tab.locator("img").count() == 0 and browser.dialogs == []
    page.close()
    page, state = open_worker(browser, center, center.boris, initialized(call))
    assert state == "highlighted"
    page.wait_for_function("() => window.card.commands.length >= 2")
    sent = dict(card_commands(page))["CallCardSetCardTitle"]["title"]
    assert "<" not in sent and ">" not in sent and "‹img src=x onerror=alert(1)›" in sent
    assert page.locator("img").count() == 0 and browser.dialogs == []
    page.close()


def test_forged_and_foreign_auth_are_refused(browser, center, emulator):
    call = center.dial("Позвонить клиенту", "+7 916 555-44-38")
    page, state = open_worker(browser, center, center.boris, initialized(call), AUTH_ID=secrets.token_hex(24))
    assert state == "refused" and card_commands(page) == []
    page.close()
    lookup = center.url + "placement/lookup"
    _, _, genuine = center.frame(center.boris, "PAGE_BACKGROUND_WORKER")
    form = {"AUTH_ID": genuine["AUTH_ID"], "member_id": genuine["member_id"], "CALL_ID": call["CALL_ID"],
            "PHONE_NUMBER": "+79165554438"}  # as the card gives it: its CALL_ID may not be stored yet
    assert requests.post(lookup, data=form, timeout=10).json()["state"] == "dialer"
    # Our own employee's token, but a request naming another portal.
    assert requests.post(lookup, data=dict(form, member_id="f" * 32), timeout=10).status_code == 403
    # A genuine token of another portal, sent with our member_id: our portal does not know it.
    with Bitrix24Emulator() as other:
        stranger = int(other.add_user("Mallory", inner="102")["ID"])
        _, foreign = other.frame_form(stranger, "PAGE_BACKGROUND_WORKER")
    answer = requests.post(lookup, data=dict(form, AUTH_ID=foreign["AUTH_ID"]), timeout=10)
    assert answer.status_code == 403 and answer.json() == {"state": "refused"}
    card = requests.post(center.url + "placement/card?LANG=ru", data=dict(genuine, AUTH_ID=foreign["AUTH_ID"]), timeout=10)
    assert card.status_code == 403 and "Доступ не подтверждён" in card.text
    refused = [e for e in center.pbx.log() if e.get("outcome") == "refused"]
    assert len(refused) == 4 and genuine["AUTH_ID"] not in center.pbx.log_text()


@pytest.mark.parametrize("placements_timeout", ["1"])  # the portal never answers in time, however long
def test_slow_portal_falls_back_to_no_highlight_and_no_error_page(browser, center, emulator):
    call = center.dial("Позвонить клиенту", "+7 916 555-44-39")
    emulator.set_delay(60, method="user.current")  # a portal that never answers in time
    page, state = open_worker(browser, center, center.boris, initialized(call))
    assert state == "unavailable" and card_commands(page) == []
    page.close()
    options = {"CALL_ID": call["CALL_ID"], "PHONE_NUMBER": "+79165554439"}
    action, query, body = center.frame(center.boris, "CALL_CARD", options)
    page = browser.open(portal_page(action, query, body))
    assert browser.wait_state(page, {"dialer", "unavailable", "refused", "unknown"}) == "unavailable"
    assert "Bitrix24 не ответил вовремя" in browser.widget(page).locator("#message").inner_text()
    page.close()
    emulator.clear_faults()
