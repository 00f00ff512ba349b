"""A process-mode call step loads only what it uses, and takes its settings as validated before.

A step is a whole Python process per call step: what it imports is most of what it costs. These
tests run the real entry point under the fake Asterisk, with a wrapper that writes the modules
the process loaded just before it ends (its own os._exit), and check what a step must not load
and that the settings a step uses without pydantic are exactly the validated ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from conftest import PBX

from agi_bitrix.controllers import EVENTS

from agi_bitrix.settings import load
from agi_bitrix.settings_file import CACHE_FILE, CachedSettings
from agi_bitrix.testing.fake_asterisk import AGIRun, FakeAsterisk

WRAPPER = """
import json, os, sys
out, first = sys.argv.pop(1), os.getpid()
end = os._exit
def _exit(code):
    if os.getpid() == first:  # not a child delivering after the step (`answer`)
        with open(out, "w") as fh:
            json.dump(sorted(sys.modules), fh)
    end(code)
os._exit = _exit
from agi_bitrix.cli import main
main()
"""
HEAVY = ("pydantic", "pydantic_core", "requests", "urllib3")


def step_with_modules(pbx: PBX, tmp_path: Path, args: List[str], **kw) -> "tuple[AGIRun, set]":
    """One call step through the real entry point; also the modules its process had loaded."""
    script, out = tmp_path / "wrapper.py", tmp_path / "modules.json"
    script.write_text(WRAPPER, encoding="utf-8")
    out.unlink(missing_ok=True)
    run = FakeAsterisk([sys.executable, str(script), str(out)], args,
                       env={"AGI_BITRIX_SETTINGS": str(pbx.settings_file)}, timeout=120, **kw).run()
    return run, set(json.loads(out.read_text(encoding="utf-8")))


def registered_for(emulator, linkedid: str) -> str:
    call = next(c for c in emulator.calls.values() if c["external_call_id"] == linkedid)
    return str(call["register"]["USER_PHONE_INNER"])


def test_an_incoming_step_loads_neither_pydantic_nor_an_http_library(pbx, emulator, tmp_path):
    assert pbx.run(["incoming", "89161234567"], linkedid="1796000000.1").set_variables["BITRIX_STATUS"] == "OK"
    run, modules = step_with_modules(pbx, tmp_path, ["incoming", "89161234567"], linkedid="1796000000.2")
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert registered_for(emulator, "1796000000.2") == "101"
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    assert "agi_bitrix.settings" not in modules  # the settings came validated from the cache


@pytest.mark.parametrize("event", sorted(EVENTS))
def test_no_event_loads_pydantic_or_an_http_library(event):
    """What a step imports for its event, its settings, its client and its journal."""
    code = ("import importlib, sys\n"
            "from agi_bitrix import dispatcher, outbox, settings_file, store\n"
            "from agi_bitrix.bitrix import factory, http\n"
            f"importlib.import_module({EVENTS[event]!r})\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in sys.argv[1:])))\n")
    loaded = subprocess.run([sys.executable, "-c", code, *HEAVY], capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == []


def test_the_answer_step_does_not_load_phonenumbers(pbx, tmp_path):
    pbx.run(["incoming", "89161234567"], linkedid="1796000001.1")
    run, modules = step_with_modules(pbx, tmp_path, ["answer"], linkedid="1796000001.1",
                                     channel="PJSIP/101-00000001")
    assert run.set_variables["BITRIX_STATUS"] in ("OK", "QUEUED")
    assert "phonenumbers" not in modules
    assert not modules & set(HEAVY)


def test_changed_settings_reach_the_next_step(pbx, emulator):
    pbx.run(["incoming", "89161234567"], linkedid="1796000002.1")
    pbx.set("calls", "default_user", "102")
    pbx.run(["incoming", "89161234567"], linkedid="1796000002.2")
    assert registered_for(emulator, "1796000002.2") == "102"
    pbx.run(["incoming", "89161234567"], linkedid="1796000002.3", env={"AGI_BITRIX_CALLS_DEFAULT_USER": "103"})
    assert registered_for(emulator, "1796000002.3") == "103"
    (pbx.settings_file.parent / ".env").write_text("AGI_BITRIX_CALLS_DEFAULT_USER=101\n", encoding="utf-8")
    pbx.run(["incoming", "89161234567"], linkedid="1796000002.4")
    assert registered_for(emulator, "1796000002.4") == "101"


def test_settings_broken_after_a_good_step_are_refused_not_taken_from_the_cache(pbx, emulator):
    pbx.run(["incoming", "89161234567"], linkedid="1796000003.1")
    pbx.set("calls", "default_user", "not-a-number")
    # Unreadable settings name no log file: the step falls back to the one in its environment.
    run = pbx.run(["incoming", "89161234567"], linkedid="1796000003.2",
                  env={"AGI_BITRIX_LOGGING_FILE": str(pbx.log_file)})
    assert run.set_variables["BITRIX_STATUS"] == "ERROR"
    line = pbx.log()[-1]
    assert line["linkedid"] == "1796000003.2" and "[calls] default_user" in line["reason"]
    assert not any(c["external_call_id"] == "1796000003.2" for c in emulator.calls.values())


def test_a_cache_others_could_have_written_is_not_trusted(pbx, emulator):
    pbx.run(["incoming", "89161234567"], linkedid="1796000004.1")
    cache = pbx.state_dir / CACHE_FILE
    kept = json.loads(cache.read_text(encoding="utf-8"))
    kept["settings"]["calls"]["default_user"] = "103"  # what someone else's write would say
    cache.write_text(json.dumps(kept), encoding="utf-8")
    os.chmod(cache, 0o666)
    pbx.run(["incoming", "89161234567"], linkedid="1796000004.2")
    assert registered_for(emulator, "1796000004.2") == "101"  # validated again, not the forgery
    os.chmod(cache, 0o600)  # the control: the same forgery in a private file is the cache's word
    cache.write_text(json.dumps(kept), encoding="utf-8")
    pbx.run(["incoming", "89161234567"], linkedid="1796000004.3")
    assert registered_for(emulator, "1796000004.3") == "103"


def test_the_cached_settings_read_as_the_validated_ones(tmp_path):
    ini = tmp_path / "settings.ini"
    ini.write_text((Path(__file__).parent.parent / "settings.ini.sample").read_text(encoding="utf-8"),
                   encoding="utf-8")
    env = {"AGI_BITRIX_BITRIX24_WEBHOOK_URL": "https://b24.example.com/rest/1/abcdefgh/",
           "AGI_BITRIX_ASTERISK_AMI_SECRET": "s3cret", "AGI_BITRIX_DIALER_TIMEZONE": "Asia/Omsk",
           "AGI_BITRIX_STORAGE_STATE_DIR": str(tmp_path)}
    model = load(str(ini), env)
    cached = CachedSettings(json.loads(json.dumps(model.model_dump())))
    for section, fields in model.model_dump().items():
        if not isinstance(fields, dict):
            assert getattr(cached, section) == fields
            continue
        for name in fields:
            mine, theirs = getattr(getattr(cached, section), name), getattr(getattr(model, section), name)
            assert (mine, type(mine)) == (theirs, type(theirs)), f"[{section}] {name}"
    assert cached.bitrix24.mode == model.bitrix24.mode == "webhook"
    assert cached.secrets() == model.secrets() == ["s3cret", "abcdefgh"]
    assert cached.dialer.operator_timezone == model.dialer.operator_timezone == "Asia/Omsk"
