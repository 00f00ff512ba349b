"""`agi-bitrix check` names every broken setup and its fix in one line (through the installed entry point)."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from agi_bitrix.testing.fake_ami import FakeAMI
from conftest import ENTRY, WEBHOOK_CODE, installs


def check(pbx, *extra):
    res = pbx.admin("check", *extra) if not pbx.prefix else pbx.cli("check", *extra)
    return res, _problems(res.stdout)


def _problems(stdout):
    return [line for line in stdout.splitlines() if line.startswith(("PROBLEM", "ПРОБЛЕМА"))]


def only_problem(res, problems):
    """Exactly one problem line, exit 1, and the same line summarised on stderr."""
    assert res.returncode == 1, res.stdout + res.stderr
    assert len(problems) == 1, res.stdout
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    return problems[0]


def with_ami(pbx, ami, secret=None):
    pbx.values["asterisk"].update(ami_host="127.0.0.1", ami_port=str(ami.port), ami_user=ami.username,
                                  ami_secret=secret or ami.secret)
    pbx.write()


# -- AMI ------------------------------------------------------------------------------------------

def test_ami_with_originate_rights_is_all_good(pbx):
    with FakeAMI(secret="ami-pass", auth_fail_delay=0.05) as ami:
        with_ami(pbx, ami)
        res, problems = check(pbx)
    assert res.returncode == 0 and problems == [], res.stdout
    assert f"AMI 127.0.0.1:{ami.port} answered" in res.stdout and "crm may originate calls" in res.stdout
    assert ami.violations == [] and ami.logins == 1


def test_ami_wrong_password(pbx):
    with FakeAMI(secret="ami-pass", auth_fail_delay=0.05) as ami:
        with_ami(pbx, ami, secret="wrong-pass")
        res, problems = check(pbx)
    line = only_problem(res, problems)
    assert "AMI refused the login of crm" in line and "ami_secret" in line and "manager reload" in line
    assert ami.failed_logins == 1 and "wrong-pass" not in res.stdout + res.stderr


def test_ami_user_without_originate_rights(pbx):
    # manager.conf: write = reporting only; Asterisk answers Originate with "Permission denied".
    with FakeAMI(secret="ami-pass", auth_fail_delay=0.05, write={"reporting"}) as ami:
        with_ami(pbx, ami)
        res, problems = check(pbx)
    line = only_problem(res, problems)
    assert "AMI user crm may not run Originate" in line and "ExtensionState" not in line
    assert "write = originate,call" in line and "manager reload" in line
    assert [a.get("Action") for a in ami.actions] == ["ListCommands", "Logoff"]   # nothing dialed


def test_fake_ami_refuses_actions_the_user_may_not_run():
    from agi_bitrix.pbx.ami import AMIClient, AMIError

    with FakeAMI(auth_fail_delay=0.05, write={"call"}) as ami:
        with AMIClient(*ami.address, "crm", "change-me", timeout=2.0) as client:
            with pytest.raises(AMIError, match="Permission denied"):
                client.originate("PJSIP/101", context="x", exten="s")
            assert client.extension_state("101") == (-1, "Unknown")   # `call` is enough for it
            names = [name for name, _ in client.action("ListCommands").headers]
    assert "Originate" not in names and "ExtensionState" in names and ami.originates == []


def test_port_that_answers_but_is_not_ami(pbx, emulator):
    # The emulator is an HTTP server: it waits for a request and never greets.
    pbx.values["asterisk"].update(ami_host="127.0.0.1", ami_port=str(emulator.base_url.rsplit(":", 1)[1]),
                                  ami_user="crm", ami_secret="x")
    pbx.write()
    res, problems = check(pbx)
    line = only_problem(res, problems)
    assert "answers but is not AMI (it said nothing)" in line and "ami_port" in line


def test_port_that_greets_with_something_else(pbx):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def greet():
        for _ in range(2):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            conn.close()

    threading.Thread(target=greet, daemon=True).start()
    pbx.values["asterisk"].update(ami_host="127.0.0.1", ami_port=str(server.getsockname()[1]), ami_user="crm")
    pbx.write()
    try:
        res, problems = check(pbx)
    finally:
        server.close()
    line = only_problem(res, problems)
    assert "is not AMI (it said 'SSH-2.0-OpenSSH_9.2')" in line


def test_ami_connection_refused_and_unknown_host(pbx):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    pbx.values["asterisk"].update(ami_host="127.0.0.1", ami_port=str(port), ami_user="crm")
    pbx.write()
    res, problems = check(pbx)
    line = only_problem(res, problems)
    assert f"nothing listens on 127.0.0.1:{port}" in line and "enabled = yes" in line

    pbx.set("asterisk", "ami_host", "no-such-pbx.invalid")
    res, problems = check(pbx)
    line = only_problem(res, problems)
    assert "AMI host no-such-pbx.invalid does not resolve" in line and "ami_host" in line


# -- the AGI script -------------------------------------------------------------------------------

def installed(pbx, tmp_path):
    agi_bin = tmp_path / "agi-bin"
    agi_bin.mkdir()
    res = pbx.cli("install", "--agi-bin", str(agi_bin), "--settings", str(pbx.settings_file))
    assert res.returncode == 0, res.stderr
    return agi_bin, agi_bin / "agi-bitrix"


@installs
def test_agi_script_installed_is_all_good(pbx, tmp_path):
    agi_bin, script = installed(pbx, tmp_path)
    res, problems = check(pbx, "--agi-bin", str(agi_bin))
    assert res.returncode == 0 and problems == [], res.stdout
    assert f"{script} runs " in res.stdout


@installs
def test_agi_script_not_executable(pbx, tmp_path):
    agi_bin, script = installed(pbx, tmp_path)
    script.chmod(0o644)
    res, problems = check(pbx, "--agi-bin", str(agi_bin))
    line = only_problem(res, problems)
    assert f"{script} is not executable" in line and f"chmod 755 {script}" in line


@installs
def test_agi_script_points_at_a_moved_virtual_environment(pbx, tmp_path):
    agi_bin, script = installed(pbx, tmp_path)
    text = script.read_text()
    moved = "/opt/old-venv-that-moved/bin/python3"
    script.write_text(f"#!{moved}\n" + text.split("\n", 1)[1])
    res, problems = check(pbx, "--agi-bin", str(agi_bin))
    line = only_problem(res, problems)
    assert f"runs {moved}, which no longer exists" in line and f"install --agi-bin {agi_bin}" in line


def test_agi_script_missing_from_the_given_agi_bin(pbx, tmp_path):
    res, problems = check(pbx, "--agi-bin", str(tmp_path))
    line = only_problem(res, problems)
    assert f"{tmp_path / 'agi-bitrix'} is missing: run agi-bitrix install --agi-bin {tmp_path}" in line


# -- Bitrix24 -------------------------------------------------------------------------------------

def test_bitrix24_connection_refused_in_plain_words(pbx, emulator):
    url = emulator.webhook_url
    port = emulator.base_url.rsplit(":", 1)[1]
    emulator.stop()
    pbx.set("bitrix24", "webhook_url", url)
    res, problems = check(pbx)
    line = only_problem(res, problems)
    assert f"127.0.0.1 refused the connection on port {port}" in line and "webhook_url" in line
    for raw in ("NewConnectionError", "HTTPConnection", "Max retries", "Errno"):
        assert raw not in res.stdout + res.stderr
    assert WEBHOOK_CODE not in res.stdout + res.stderr


def test_bitrix24_name_that_does_not_resolve(pbx):
    pbx.set("bitrix24", "webhook_url", f"https://no-such-portal.invalid/rest/1/{WEBHOOK_CODE}/")
    res, problems = check(pbx)
    line = only_problem(res, problems)
    assert "the name no-such-portal.invalid does not resolve (DNS)" in line and "/etc/resolv.conf" in line
    for raw in ("NameResolutionError", "gaierror", "HTTPSConnection", "Errno"):
        assert raw not in res.stdout + res.stderr


@pytest.mark.parametrize("url, says", [
    ("https://portal.example.ru/1/abcdef12/", "must look like https://PORTAL/rest/USER_ID/CODE/"),
    ("https://portal.example.ru/rest/1/abcdef12/profile.json",
     "ends with a method (profile.json): remove it, keep https://PORTAL/rest/USER_ID/CODE/"),
    ("https://portal.example.ru/rest/1/abcdef12/telephony.externalcall.register/",
     "ends with a method (telephony.externalcall.register)"),
])
def test_webhook_url_without_rest_or_with_a_method(pbx, url, says):
    pbx.set("bitrix24", "webhook_url", url)
    res, problems = check(pbx)
    line = only_problem(res, problems)
    assert "[bitrix24] webhook_url" in line and says in line


# -- files ----------------------------------------------------------------------------------------

@pytest.fixture
def open_tree():
    """A folder every user may enter (pytest's own tmp root is 0700), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="agib-check-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@needs_root
@installs
def test_settings_unreadable_by_the_asterisk_user(pbx, open_tree):
    agi_bin = open_tree / "agi-bin"
    agi_bin.mkdir()
    etc = open_tree / "etc"
    etc.mkdir(mode=0o755)
    settings = etc / "settings.ini"
    shutil.copy(pbx.settings_file, settings)
    settings.chmod(0o600)   # root's: check (root) reads it, Asterisk (nobody) would not
    res = pbx.cli("install", "--agi-bin", str(agi_bin), "--settings", str(settings), "--owner", "nobody")
    assert res.returncode == 0, res.stderr
    os.chown(settings, 0, 0)
    res = pbx.cli("check", "--settings", str(settings), "--agi-bin", str(agi_bin))
    line = only_problem(res, _problems(res.stdout))
    assert f"the Asterisk user nobody cannot read {settings}" in line and f"chown nobody {settings}" in line

    os.chown(settings, 65534, -1)
    etc.chmod(0o700)
    res = pbx.cli("check", "--settings", str(settings), "--agi-bin", str(agi_bin))
    line = only_problem(res, _problems(res.stdout))
    assert f"the Asterisk user nobody cannot enter the folder {etc}" in line and f"chmod o+x {etc}" in line


@contextlib.contextmanager
def _enterable_by_everyone(path):
    """`nobody` must reach the installed entry point, wherever the checkout lies (a clone in a
    folder of mode 0700 is not enterable by others): o+x on the folders above it, for the
    command's run only. Only search rights: nobody gains the right to read a folder."""
    changed = []
    try:
        for folder in (Path(path).parents if path is not None else []):
            mode = folder.stat().st_mode
            if not mode & 0o001:
                folder.chmod(mode | 0o001)
                changed.append((folder, mode))
        yield
    finally:
        for folder, mode in changed:
            folder.chmod(mode)


def test_settings_unreadable_by_the_user_running_check(open_tree):
    """The Asterisk user itself runs check (or a step): the error names the user and the fix."""
    import pwd

    settings = open_tree / "settings.ini"
    settings.write_text("[calls]\ndefault_user = 101\n")
    user = pwd.getpwuid(os.geteuid()).pw_name
    # As root a missing read bit stops nobody, so let `nobody` run the command when we are root.
    pre = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    if pre:
        if not shutil.which("setpriv"):
            pytest.skip("setpriv not available")
        user = "nobody"
    settings.chmod(0o000)
    import subprocess

    env = dict(os.environ, AGI_BITRIX_SETTINGS=str(settings))
    with _enterable_by_everyone(ENTRY if pre else None):
        res = subprocess.run(pre + [str(ENTRY), "check"], capture_output=True, text=True, env=env,
                             stdin=subprocess.DEVNULL, timeout=120, cwd="/")
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"settings file {settings} is not readable by the user {user}" in res.stderr
    assert f"chown {user} {settings}" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_log_folder_missing_says_run_install_again(pbx):
    shutil.rmtree(pbx.log_file.parent)
    res, problems = check(pbx)
    line = only_problem(res, problems)
    assert f"{pbx.log_file.parent} does not exist: run agi-bitrix install again" in line
    assert not pbx.log_file.parent.exists()   # check creates nothing (it runs as root)


def test_settings_saved_with_a_byte_order_mark_are_read(pbx, emulator):
    pbx.settings_file.write_bytes(b"\xef\xbb\xbf" + pbx.settings_file.read_bytes())
    res, problems = check(pbx)
    assert res.returncode == 0 and problems == [], res.stdout + res.stderr
    assert "all good" in res.stdout
    run = pbx.run(["incoming", "89161234567"], linkedid="bom.1")
    assert run.set_variables["BITRIX_STATUS"] == "OK" and len(emulator.calls) == 1


# -- calls failing right now ----------------------------------------------------------------------

def test_calls_failing_right_now_are_counted_with_the_last_reason(pbx):
    assert pbx.run(["incoming", "89161234567"], linkedid="ok.1").set_variables["BITRIX_STATUS"] == "OK"
    for linkedid in ("lost.1", "lost.2"):
        assert pbx.run(["answer", "102"], linkedid=linkedid).set_variables["BITRIX_STATUS"] == "ERROR"
    res, problems = check(pbx)
    line = only_problem(res, problems)
    assert "2 of 3 call steps in the last hour ended in ERROR" in line
    assert "the last (answer at" in line and "no call is known for this linkedid" in line


def test_no_recent_failures_is_fine(pbx):
    assert pbx.run(["incoming", "89161234567"], linkedid="ok.2").set_variables["BITRIX_STATUS"] == "OK"
    res, problems = check(pbx)
    assert res.returncode == 0 and "1 call steps in the last hour, none failed" in res.stdout
