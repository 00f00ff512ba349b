"""Operations: log rotation, hardened systemd units, the samples shipped in the package."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agi_bitrix import log as log_mod
from agi_bitrix.settings import LoggingSettings, StorageSettings

REPO = Path(__file__).resolve().parent.parent
CONTRIB = REPO / "contrib"
UNITS = sorted(CONTRIB.glob("*.service"))


def _lines(path: Path):
    return [json.loads(line)["event"] for line in path.read_text().splitlines() if line]


def test_logger_reopens_the_file_after_it_was_moved_or_removed(tmp_path):
    path = tmp_path / "agi-bitrix.log"
    logger = log_mod.configure(str(path))
    logger.info("before")
    path.rename(tmp_path / "agi-bitrix.log.1")   # logrotate's default (create) mode
    logger.info("after")
    path.unlink()
    logger.info("after_removal")
    assert _lines(tmp_path / "agi-bitrix.log.1") == ["before"]
    assert _lines(path) == ["after_removal"]


def _rotate(log_file: Path, tmp_path: Path) -> None:
    """The contrib logrotate file run for real (paths and user adapted), else its effect by hand."""
    if not shutil.which("logrotate"):
        log_file.rename(log_file.with_name(log_file.name + ".1"))
        return
    conf = (CONTRIB / "agi-bitrix.logrotate").read_text()
    conf = conf.replace("/var/log/agi-bitrix", str(log_file.parent))
    conf = re.sub(r"asterisk asterisk", f"{log_file.owner()} {log_file.group()}", conf)
    (tmp_path / "logrotate.conf").write_text(conf)
    res = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "logrotate.state"), str(tmp_path / "logrotate.conf")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_worker_writes_to_the_new_log_after_logrotate(pbx, tmp_path):
    from conftest import ENTRY

    import os

    env = dict(os.environ, AGI_BITRIX_SETTINGS=str(pbx.settings_file))
    env.pop("AST_AGI_DIR", None)
    worker = subprocess.Popen([str(ENTRY), "worker", "--interval", "0.2"], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60   # synchronisation only: the worker has started and logged
        while "worker_started" not in pbx.log_text():
            assert worker.poll() is None and time.monotonic() < end, "the worker never started"
            time.sleep(0.05)
        _rotate(pbx.log_file, tmp_path)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, worker.stderr.read()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert _lines(pbx.log_file.with_name("agi-bitrix.log.1")) == ["worker_started"]
    assert _lines(pbx.log_file) == ["worker_stopped"]


def _unit_keys(path: Path):
    keys: dict = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_units_are_hardened(unit):
    keys = _unit_keys(unit)
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "PrivateDevices": "yes", "RestrictSUIDSGID": "yes",
                       "CapabilityBoundingSet": "", "RestrictNamespaces": "yes"}.items():
        assert keys.get(key) == [value], f"{unit.name}: {key}"
    # Writable: only the state and log folders of the default settings.
    writable = set(" ".join(keys["ReadWritePaths"]).split())
    assert writable == {StorageSettings().state_dir, str(Path(LoggingSettings().file).parent)}
    assert keys["User"] != ["root"] and "AF_INET" in keys["RestrictAddressFamilies"][0]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_analyze_security_exposure_at_most_5(unit, tmp_path):
    copy = tmp_path / unit.name
    shutil.copy(unit, copy)
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(copy)],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert found, res.stdout + res.stderr
    assert float(found.group(1)) <= 5.0, res.stdout


@pytest.mark.parametrize("name", ["settings.ini.sample", "extensions.conf.sample"])
def test_packaged_samples_are_the_repository_samples(name):
    assert (REPO / "agi_bitrix" / "data" / name).read_bytes() == (REPO / name).read_bytes()


def test_code_cites_public_documentation_not_files_outside_the_repository():
    pattern = re.compile(r"reference §|reference \d|\(reference|CONTRACT\.md|DESIGN\.md|[Ss]eed \d|shared/(reference|seeds)"
                         r"|fixtures PART|/work/")
    me = Path(__file__).resolve()
    found = [f"{path.relative_to(REPO)}:{n}" for folder in ("agi_bitrix", "tests", "bench")
             for path in sorted((REPO / folder).rglob("*.py")) if path.resolve() != me
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_the_sample_settings_load_as_they_are():
    from agi_bitrix.settings import load

    settings = load(str(REPO / "settings.ini.sample"), environ={})
    assert settings.logging.language == "auto" and settings.bitrix24.mode == "none"
