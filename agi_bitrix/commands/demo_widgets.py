"""The demo's auto-dialer call and what the operator's Bitrix24 call card shows for it.

A local application (OAuth) on the emulator, `agi-bitrix auth` binding the widgets, the fake AMI
answering the dialer's Originate, the dialplan's `dialer-answered` step popping up the operator's
card, and `agi-bitrix serve` answering the card's widgets exactly as it would for his browser.
"""
from __future__ import annotations

import html
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import requests

from agi_bitrix.testing.bitrix_emulator import Bitrix24Emulator
from agi_bitrix.testing.fake_ami import FakeAMI, OriginateOutcome, originate_variables
from agi_bitrix.testing.fake_asterisk import FakeAsterisk

SETTINGS = """[bitrix24]
portal_url = {portal}
client_id = {client_id}
client_secret = {client_secret}
oauth_url = {oauth}
[calls]
default_user = 101
[storage]
state_dir = {state}
[logging]
file = {log}
[asterisk]
dial_template = PJSIP/{{number}}@provider
ami_port = {ami_port}
ami_user = {ami_user}
ami_secret = {ami_secret}
[dialer]
hours = 00:00-24:00
hours_weekend = 00:00-24:00
[events]
listen = 127.0.0.1:{port}
[placements]
public_url = http://127.0.0.1:{port}/
timeout = 4
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _text(page: str) -> List[str]:
    """The tab's visible lines, as an operator reads them."""
    body = re.sub(r"(?s)<(style|script)[^>]*>.*?</\1>", "", page)
    body = re.sub(r"</(tr|dd|h1|span|p|caption)>", "\n", body)
    body = re.sub(r"</(td|th|dt)>", "  ", body)
    lines = (html.unescape(re.sub(r"<[^>]+>", "", line)).strip() for line in body.splitlines())
    return [re.sub(r"\s{3,}", "  ", line) for line in lines if line]


def dialer_card(folder: Path, emulator: Bitrix24Emulator, script: List[str], people: Dict[str, int]) -> bool:
    """Run one dialer attempt and print the card's title, status text and tab. True when marked."""
    port = _free_port()
    settings = folder / "dialer-settings.ini"
    env = dict(os.environ, AGI_BITRIX_SETTINGS=str(settings))
    env.pop("AST_AGI_DIR", None)
    hang_up = threading.Event()
    with FakeAMI(username="crm", secret="demo-ami-secret") as ami:
        settings.write_text(SETTINGS.format(
            portal=emulator.base_url, client_id=emulator.client_id, client_secret=emulator.client_secret,
            oauth=emulator.oauth_url, state=folder / "dialer-state", log=folder / "agi-bitrix.log",
            ami_port=ami.port, ami_user=ami.username, ami_secret=ami.secret, port=port), encoding="utf-8")
        settings.chmod(0o600)

        def answered(action: Any) -> None:
            lid = action.get("ChannelId")
            variables = dict(originate_variables(action))
            FakeAsterisk(script, ["dialer-answered"], linkedid=lid, uniqueid=lid, context="bitrix-dialer",
                         extension="client", variables=variables, env={"AGI_BITRIX_SETTINGS": str(settings)},
                         channel=action.get("Channel") + "-0001").run()
            hang_up.wait(30)
            FakeAsterisk(script, ["hangup", "NOANSWER", ""], linkedid=lid, dead=True, variables=variables,
                         env={"AGI_BITRIX_SETTINGS": str(settings)}).run()

        ami.on_originate(lambda action: OriginateOutcome(reason=4, on_answer=lambda: answered(action)))
        boris = people["102"]
        group = emulator.add_group("CallCenter", [people["101"], boris], owner_id=people["101"])
        contact = emulator.add_contact("Olga Smirnova", ["+7 916 222-33-44"], assigned_by_id=boris)
        task = emulator.add_task("Позвонить клиенту", boris, group_id=int(group["ID"]),
                                 deadline="2026-01-10T18:00:00+03:00", crm=[f"C_{contact['ID']}"])
        auth = subprocess.run([*script, "auth", "--code", "-"], env=env, capture_output=True, text=True,
                              input=emulator.authorization_code() + "\n")  # as pasted: never on the command line
        print(f"    agi-bitrix auth: {(auth.stdout or auth.stderr).strip().split('; note: ')[-1]}")
        serve = subprocess.Popen([*script, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, text=True)
        try:
            serve.stdout.readline()
            before = set(emulator.calls)
            subprocess.run([*script, "dialer", "run", "--once"], env=env, capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=60)
            end, call = time.time() + 20, None
            while time.time() < end and call is None:
                call = next((c for c in emulator.calls.values() if c["CALL_ID"] not in before), None)
                time.sleep(0.05)
            if call is None:
                print("    the dialer call was not registered")
                return False
            print(f"    task #{task['ID']} dialed; Boris's card pops up for {call['CALL_ID']}")
            query, form = emulator.frame_form(boris, "PAGE_BACKGROUND_WORKER")
            base = f"http://127.0.0.1:{port}/placement/"
            card = {"CALL_ID": call["CALL_ID"], "PHONE_NUMBER": call["register"]["PHONE_NUMBER"]}
            mark = requests.post(base + "lookup", data=dict(form, LANG="ru", **card), timeout=10).json()
            print(f"    call card title:  {mark.get('title', '(none)')}")
            print(f"    call card status: {mark.get('status', '(none)')}")
            query, form = emulator.frame_form(boris, "CALL_CARD", card)
            tab = requests.post(base + "card", params=query, data=form, timeout=10).text
            print("    tab «Клиент и задача»:")
            for line in _text(tab)[1:]:
                print(f"      {line}")
            return bool(mark.get("title"))
        finally:
            hang_up.set()
            serve.terminate()
            serve.wait(10)
