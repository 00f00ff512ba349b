"""Mode 2 (local application, OAuth 2.0) through the real entry point: `agi-bitrix auth`, call steps
sharing one rotating token pair, a revoked application, and `agi-bitrix check`."""
from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import List

from conftest import HELD, STEP_BUDGET, only_call

INBOUND = dict(channel="PJSIP/provider-00000001", context="bitrix-inbound", extension="74951234567",
               dnid="74951234567")


def use_oauth(pbx, emulator, timeout: str = STEP_BUDGET) -> None:
    """Switch the PBX to the local application of the emulator's portal (no tokens yet)."""
    pbx.values["bitrix24"] = {"portal_url": emulator.base_url, "client_id": emulator.client_id,
                              "client_secret": emulator.client_secret, "oauth_url": emulator.oauth_url,
                              "timeout": timeout}
    pbx.write()


def authorized(pbx, emulator, timeout: str = STEP_BUDGET) -> None:
    use_oauth(pbx, emulator, timeout)
    res = pbx.cli("auth", "--code", stdin=emulator.authorization_code() + "\n")
    assert res.returncode == 0, res.stderr


def secrets_of(pbx, emulator) -> List[str]:
    tokens = json.loads((pbx.state_dir / "oauth-tokens.json").read_text())
    return [tokens["access_token"], tokens["refresh_token"], emulator.client_secret]


def test_no_tokens_yet_is_a_clear_refusal(pbx, emulator):
    use_oauth(pbx, emulator)
    run = pbx.run(["incoming", "89161234567"], linkedid="1795500000.1")
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "ERROR"
    assert "no OAuth tokens yet: run agi-bitrix auth --code" in pbx.log()[-1]["reason"]
    assert not emulator.calls


def test_auth_code_through_the_cli(pbx, emulator):
    use_oauth(pbx, emulator)
    res = pbx.cli("auth", "--code", stdin="not-a-code\n")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "older than 30 seconds" in res.stderr and emulator.client_secret not in res.stderr

    code = emulator.authorization_code()
    redirect = f"https://pbx.example.com/?code={code}&state=x&domain=portal.bitrix24.ru&member_id=m"
    res = pbx.cli("auth", "--code", stdin=redirect + "\n")  # the address bar as the browser shows it
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 1 and "OAuth tokens stored" in res.stdout
    store = pbx.state_dir / "oauth-tokens.json"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert not any(s in res.stdout + res.stderr for s in secrets_of(pbx, emulator) + [code])
    grant = emulator.requests_for("oauth.token")[-1]["params"]
    assert grant["grant_type"] == "authorization_code" and emulator.refresh_count == 0

    run = pbx.run(["incoming", "89161234567", "74951234567"], linkedid="1795500001.1")
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    assert emulator.requests_for("telephony.externalcall.register")[-1]["auth"] == "oauth"
    assert only_call(emulator)["register"]["USER_PHONE_INNER"] == "101"

    again = pbx.cli("auth", "--code", "-", stdin=code)  # a code works once
    assert again.returncode == 1 and "authorization code" in again.stderr


def test_auth_refresh_token_through_the_cli(pbx, emulator, tmp_path):
    res = pbx.cli("auth", "--refresh-token", "-", stdin="x\n")  # still in webhook mode: nothing to authorize
    assert res.returncode == 1 and "client_id" in res.stderr

    use_oauth(pbx, emulator)
    pair = emulator.issue_tokens()
    res = pbx.cli("auth", "--refresh-token", "-", stdin=pair["refresh_token"] + "\n")
    assert res.returncode == 0, res.stderr
    assert pair["refresh_token"] not in res.stdout + res.stderr and emulator.refresh_count == 1
    run = pbx.run(["incoming", "89161234567"], linkedid="1795500002.1")
    assert run.set_variables["BITRIX_STATUS"] == "OK" and len(emulator.calls) == 1

    spent_file = tmp_path / "token"
    spent_file.write_text(pair["refresh_token"] + "\n")
    spent = pbx.cli("auth", "--refresh-token-file", str(spent_file))
    assert spent.returncode == 1 and "revoked or its refresh token is spent" in spent.stderr
    assert pair["refresh_token"] not in spent.stderr and len(spent.stderr.strip().splitlines()) == 1
    assert emulator.requests_for("oauth.token")[-1]["params"]["refresh_token"] == pair["refresh_token"]


def test_auth_never_takes_a_refresh_token_from_the_command_line(pbx, emulator):
    """A command line is visible to every user of the machine (ps): the token must come by stdin or file."""
    use_oauth(pbx, emulator)
    pair = emulator.issue_tokens()
    res = pbx.cli("auth", "--refresh-token", pair["refresh_token"])
    assert res.returncode == 2 and "--refresh-token -" in res.stderr
    assert pair["refresh_token"] not in res.stdout + res.stderr
    assert emulator.requests_for("oauth.token") == [] and not (pbx.state_dir / "oauth-tokens.json").exists()


def test_auth_typed_on_a_terminal_is_not_echoed(pbx, emulator):
    """`auth --code` on a terminal: the code (or address) is typed without echo."""
    import pty
    import select
    import subprocess
    import time

    from conftest import ENTRY

    use_oauth(pbx, emulator)
    code = emulator.authorization_code()
    master, slave = pty.openpty()
    env = dict(os.environ, AGI_BITRIX_SETTINGS=str(pbx.settings_file))
    env.pop("AST_AGI_DIR", None)
    proc = subprocess.Popen([str(ENTRY), "auth", "--code"], stdin=slave, stdout=subprocess.PIPE,
                            stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    seen = b""
    end = time.time() + 60
    while b"authorization code" not in seen and time.time() < end:  # the prompt, then type
        if select.select([master], [], [], 0.5)[0]:
            seen += os.read(master, 1024)
    os.write(master, code.encode() + b"\n")
    out, _ = proc.communicate(timeout=60)
    while True:
        try:
            chunk = os.read(master, 1024)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.returncode == 0 and b"OAuth tokens stored" in out
    assert code.encode() not in seen + out


def test_auth_code_on_the_command_line_still_works_with_a_warning(pbx, emulator):
    use_oauth(pbx, emulator)
    code = emulator.authorization_code()
    res = pbx.cli("auth", "--code", code)
    assert res.returncode == 0 and "visible to every user of this machine" in res.stderr
    assert code not in res.stdout + res.stderr


def test_concurrent_call_steps_refresh_exactly_once(any_pbx, emulator):
    """Process mode: one refresh under the PBX-wide lock. The service: single-flight in a thread.

    In process mode the first refresh is held at the OAuth server until a second step has met the
    expired token too, so two steps want a new pair at the same time however fast or slow this
    machine is (the service's steps reach the portal through its one courier)."""
    pbx = any_pbx
    # Four processes are enough: the held refresh makes two of them meet the expired token at once
    # on any machine; a process start costs a quarter second of CPU. The service's steps are cheap.
    steps = 4 if pbx.transport == "process" else 48
    authorized(pbx, emulator, timeout="60")  # plenty of time for the starts on a loaded machine
    pbx.set("bitrix24", "rate_burst", "500")  # the emulator's portal has no bucket

    def expired_answers() -> int:
        return sum(1 for r in emulator.requests if r["error"] == "expired_token")

    def burst(prefix: str) -> list:
        emulator.expire_access_tokens()  # no step holds a valid access token
        met, asked = expired_answers(), len(emulator.requests_for("oauth.token"))
        refresh = emulator.hold("oauth.token", count=1) if pbx.transport == "process" else None
        lids = [f"{prefix}.{i}" for i in range(steps)]
        with ThreadPoolExecutor(steps) as pool:
            runs = [pool.submit(pbx.run, ["incoming", "89161234567", "74951234567"], linkedid=lid,
                                timeout=120, **INBOUND) for lid in lids]
            if refresh is not None:
                try:
                    pbx.wait_for(lambda: len(emulator.requests_for("oauth.token")) > asked
                                 and expired_answers() >= met + 2,
                                 "a refresh on its way and a second step meeting the expired token")
                finally:
                    refresh.set()
            return [run.result() for run in runs]

    runs = burst("1795500100")
    assert [r.set_variables.get("BITRIX_STATUS") for r in runs] == ["OK"] * steps
    assert emulator.refresh_count == 1 and emulator.spent_refresh_uses == 0
    if pbx.transport == "fastagi":  # the service counts what it renewed
        assert pbx.service.metrics.registry.get_sample_value("agi_bitrix_token_refreshes_total") == 1
    assert len(emulator.calls) == steps

    runs = burst("1795500200")
    assert [r.set_variables.get("BITRIX_STATUS") for r in runs] == ["OK"] * steps
    assert emulator.refresh_count == 2 and emulator.spent_refresh_uses == 0
    assert len(emulator.calls) == 2 * steps and not emulator.internal_errors


def test_refresh_goes_to_the_host_of_server_endpoint(pbx, emulator):
    authorized(pbx, emulator)
    # oauth_url is only the first default: once tokens name their server_endpoint, that wins.
    pbx.set("bitrix24", "oauth_url", "http://127.0.0.1:9/oauth/token/")
    emulator.expire_access_tokens()
    run = pbx.run(["incoming", "89161234567"], linkedid="1795500300.1")
    assert run.set_variables["BITRIX_STATUS"] == "OK" and emulator.refresh_count == 1


def test_revoked_application_ends_in_a_clear_error_without_secrets(pbx, emulator):
    authorized(pbx, emulator)
    secrets = secrets_of(pbx, emulator)
    emulator.expire_access_tokens()
    emulator.revoke_app()
    run = pbx.run(["incoming", "89161234567"], linkedid="1795500400.1")
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "QUEUED"
    line = pbx.log()[-1]
    assert "revoked or its refresh token is spent: run agi-bitrix auth" in json.dumps(line)
    asked = len(emulator.requests_for("oauth.token"))

    # The refused refresh token is marked: later steps do not knock on the OAuth server again.
    run = pbx.run(["incoming", "89031112233"], linkedid="1795500400.2")
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "QUEUED"
    assert len(emulator.requests_for("oauth.token")) == asked and emulator.spent_refresh_uses == 0
    assert not emulator.calls

    text = pbx.log_text() + run.stderr
    assert not any(secret in text for secret in secrets)
    res = pbx.admin("check")
    assert res.returncode == 1 and "auth --code" in res.stdout
    assert not any(secret in res.stdout + res.stderr for secret in secrets)


def test_app_removed_while_its_token_is_live(pbx, emulator):
    authorized(pbx, emulator)
    secrets = secrets_of(pbx, emulator)
    emulator.revoke_app()  # live access tokens now answer invalid_token: no refresh may follow
    run = pbx.run(["incoming", "89161234567"], linkedid="1795500500.1")
    assert run.returncode == 0 and run.set_variables["BITRIX_STATUS"] == "QUEUED"
    assert "invalid_token" in json.dumps(pbx.log()[-1])
    assert emulator.refresh_count == 0 and len(emulator.requests_for("oauth.token")) == 1  # the code only
    assert not any(secret in pbx.log_text() + run.stderr for secret in secrets)


def test_check_in_oauth_mode(pbx, emulator):
    use_oauth(pbx, emulator)
    res = pbx.admin("check")
    assert res.returncode == 1 and "no OAuth tokens yet" in res.stdout

    authorized(pbx, emulator)
    res = pbx.admin("check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(oauth mode)" in res.stdout and "the access token works" in res.stdout
    assert "scopes present: telephony, crm, user" in res.stdout and "WARNING  bitrix24" not in res.stdout

    emulator.expire_access_tokens()
    res = pbx.admin("check")
    assert res.returncode == 0 and "the access token works (renewed just now)" in res.stdout
    assert emulator.refresh_count == 1

    emulator.scopes = ["telephony", "crm", "user_basic", "basic"]
    res = pbx.admin("check")
    assert res.returncode == 0
    assert "lacks the scope(s) task, im, sonet_group the auto-dialer needs" in res.stdout

    emulator.scopes = ["crm", "user", "task", "im", "sonet_group"]
    res = pbx.admin("check")
    assert res.returncode == 1 and "the application lacks the scope(s) telephony" in res.stdout
    assert "agi-bitrix auth --code" in res.stdout
    assert not any(secret in res.stdout + res.stderr for secret in secrets_of(pbx, emulator))
    assert os.stat(pbx.state_dir / "oauth-tokens.lock").st_mode & 0o077 == 0


def test_slow_oauth_server_never_holds_the_caller(any_pbx, emulator):
    """The refresh runs in a detached child (process mode) or a thread of the service: the caller
    waits only the budget, the rotation completes."""
    import time

    pbx = any_pbx
    authorized(pbx, emulator, timeout=pbx.short_budget)
    emulator.expire_access_tokens()
    stuck = emulator.hold("oauth.token", count=1)   # the OAuth server holds the refresh
    run = pbx.run(["incoming", "89161234567"], linkedid="1795500900.1")
    assert run.duration < HELD and run.set_variables["BITRIX_STATUS"] == "QUEUED"
    assert "in the background" in pbx.log()[-1]["reason"]
    stuck.set()
    end = time.monotonic() + 60
    while emulator.refresh_count != 1 and time.monotonic() < end:  # the child finishes the rotation
        time.sleep(0.1)
    time.sleep(0.3)
    assert emulator.refresh_count == 1 and emulator.spent_refresh_uses == 0
    run = pbx.run(["hangup", "NOANSWER", ""], linkedid="1795500900.1", dead=True)
    assert run.set_variables["BITRIX_STATUS"] == "OK"
    call = only_call(emulator)
    assert call["finished"] and call["status_code"] == "304" and emulator.refresh_count == 1
