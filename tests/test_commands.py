"""Admin commands through the installed entry point: install, check, demo, usage errors."""
from __future__ import annotations

import os
import stat
import subprocess

from conftest import ENTRY, STEP_BUDGET, WEBHOOK_CODE, installs


def cli(*args, env=None, cwd=None):
    full = dict(os.environ)
    full.pop("AST_AGI_DIR", None)
    full.update(env or {})
    return subprocess.run([str(ENTRY), *args], capture_output=True, text=True, env=full, cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=60)


@installs
def test_install_is_idempotent(tmp_path):
    agi_bin = tmp_path / "agi-bin"
    agi_bin.mkdir()
    settings = tmp_path / "etc" / "settings.ini"
    first = cli("install", "--agi-bin", str(agi_bin), "--settings", str(settings))
    assert first.returncode == 0, first.stderr
    script = agi_bin / "agi-bitrix"
    assert os.access(script, os.X_OK)
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600
    assert "[bitrix24]" in settings.read_text()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (script, settings)}
    second = cli("install", "--agi-bin", str(agi_bin), "--settings", str(settings))
    assert second.returncode == 0 and "nothing to change" in second.stdout
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (script, settings)}


@installs
def test_installed_agi_script_runs_as_asterisk_would(tmp_path, emulator):
    from agi_bitrix.testing.fake_asterisk import FakeAsterisk

    agi_bin = tmp_path / "agi-bin"
    agi_bin.mkdir()
    settings = tmp_path / "settings.ini"
    assert cli("install", "--agi-bin", str(agi_bin), "--settings", str(settings)).returncode == 0
    text = settings.read_text().replace("webhook_url =\n", f"webhook_url = {emulator.webhook_url}\n")
    text = text.replace("/var/lib/agi-bitrix", str(tmp_path / "state"))
    text = text.replace("/var/log/agi-bitrix/agi-bitrix.log", str(tmp_path / "log.txt"))
    # The suite's budget, not the sample's 2 s: a loaded machine's Python start must not make it QUEUED.
    text = text.replace("\ntimeout = 2\n", f"\ntimeout = {STEP_BUDGET}\n", 1)
    settings.write_text(text)
    run = FakeAsterisk([str(agi_bin / "agi-bitrix")], ["incoming", "89161234567"], linkedid="11.1").run()
    assert run.set_variables["BITRIX_STATUS"] == "OK" and len(emulator.calls) == 1


@installs
def test_every_command_finds_the_settings_install_was_told(tmp_path, emulator):
    agi_bin = tmp_path / "agi-bin"
    agi_bin.mkdir()
    settings = tmp_path / "conf" / "bitrix.ini"
    res = cli("install", "--agi-bin", str(agi_bin), "--settings", str(settings))
    assert res.returncode == 0 and f"recorded {settings}" in res.stdout, res.stdout + res.stderr
    text = settings.read_text().replace("webhook_url =\n", f"webhook_url = {emulator.webhook_url}\n")
    text = text.replace("/var/lib/agi-bitrix", str(tmp_path / "state"))
    text = text.replace("/var/log/agi-bitrix/agi-bitrix.log", str(tmp_path / "log.txt"))
    settings.write_text(text)
    clean = {k: v for k, v in os.environ.items() if k != "AGI_BITRIX_SETTINGS"}
    for command in (["outbox", "status"], ["check"]):
        res = subprocess.run([str(ENTRY), *command], capture_output=True, text=True, env=clean,
                             stdin=subprocess.DEVNULL, timeout=60)
        assert "/etc/agi-bitrix/settings.ini" not in res.stdout + res.stderr
        if command[0] == "outbox":
            assert res.returncode == 0, res.stderr
    assert f"{settings} read" in res.stdout  # check names the file it read


@installs
def test_install_refuses_missing_agi_bin(tmp_path):
    res = cli("install", "--agi-bin", str(tmp_path / "nope"), "--settings", str(tmp_path / "s.ini"))
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2():
    assert cli().returncode == 2
    res = cli("frobnicate")
    assert res.returncode == 2 and "agi-bitrix" in res.stderr
    assert cli("install").returncode == 2


def test_check_all_good(pbx, emulator):
    res = cli("check", "--settings", str(pbx.settings_file))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "101 Anna Test" in res.stdout and "default_user 101 is Anna Test" in res.stdout
    assert WEBHOOK_CODE not in res.stdout + res.stderr


def test_check_says_what_is_wrong(pbx, emulator):
    pbx.set("calls", "default_user", "555")
    res = cli("check", "--settings", str(pbx.settings_file))
    assert res.returncode == 1
    assert "default_user 555 is no active employee" in res.stdout
    assert len(res.stderr.strip().splitlines()) == 1

    pbx.set("bitrix24", "webhook_url", emulator.webhook_url.replace(WEBHOOK_CODE, "wrong-code"))
    res = cli("check", "--settings", str(pbx.settings_file))
    assert res.returncode == 1 and "refused the webhook" in res.stdout

    emulator.stop()
    pbx.set("bitrix24", "webhook_url", emulator.webhook_url)
    res = cli("check", "--settings", str(pbx.settings_file))
    assert res.returncode == 1 and "cannot be reached" in res.stdout
    assert WEBHOOK_CODE not in res.stdout + res.stderr


def test_check_broken_settings_one_line(tmp_path):
    bad = tmp_path / "s.ini"
    bad.write_text("[calls]\ndefault_user = nobody\n")
    res = cli("check", "--settings", str(bad))
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1 and "default_user" in res.stderr


def test_demo_shows_registered_and_finished_calls():
    res = cli("demo")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("register:") == 8 and res.stdout.count("finish: STATUS_CODE") == 8
    # The service path: three steps over FastAGI, then the fallback to process mode once it stopped.
    assert res.stdout.count("/incoming, , 74951234567) -> BITRIX_STATUS=OK") == 1
    assert res.stdout.count("-> AGISTATUS=FAILURE") == 2
    # The dialer's call is marked in the operator's Bitrix24 call card (the widgets, through serve).
    assert "call card title:  АВТООБЗВОН · Задача #1 «Позвонить клиенту»" in res.stdout
    assert "call card status: попытка 1 из 5 · у клиента " in res.stdout
    assert "STATUS_CODE 200" in res.stdout and "STATUS_CODE 486" in res.stdout
    assert "card: hide" in res.stdout and "recording:" in res.stdout
