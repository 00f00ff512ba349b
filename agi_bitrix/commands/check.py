"""`agi-bitrix check`: read the settings, reach Bitrix24 and Asterisk, say plainly what is wrong."""
from __future__ import annotations

import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from agi_bitrix import settings as settings_mod

REQUIRED_SCOPES = ("telephony", "crm", "user")  # without these no call reaches the CRM
DIALER_SCOPES = ("task", "im", "sonet_group")    # the auto-dialer: tasks, notices, workgroups
NEEDED_SCOPES = REQUIRED_SCOPES + DIALER_SCOPES


def missing_scopes(present: Any) -> List[str]:
    have = set(present or ())
    if "user_basic" in have:  # the level meant for calling scenarios (reference §1.4)
        have.add("user")
    return [scope for scope in NEEDED_SCOPES if scope not in have]


class Report:
    def __init__(self) -> None:
        self.problems: List[str] = []
        self.secrets: List[str] = []

    def _say(self, tag: str, area: str, text: str) -> None:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        print(f"{tag:<8} {area:<10} {text}")

    def ok(self, area: str, text: str) -> None:
        self._say("OK", area, text)

    def warn(self, area: str, text: str) -> None:
        self._say("WARNING", area, text)

    def problem(self, area: str, text: str) -> None:
        self._say("PROBLEM", area, text)
        self.problems.append(f"{area}: {text}")


def _writable_dir(report: Report, area: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".check-{os.getpid()}"
        probe.write_text("x")
        probe.unlink()
        report.ok(area, f"{folder} is writable")
    except OSError as exc:
        report.problem(area, f"{folder} is not writable by this user ({exc.strerror}); "
                             "it must be writable by the user Asterisk runs as")


def files_asterisk_cannot_write(state_dir: Path, log_file: Path) -> Tuple[str, List[Path]]:
    """The Asterisk user (the owner of state_dir, as `install` made it) and the files in state_dir
    and the log it cannot write: each one fails every call step run by Asterisk."""
    import pwd

    from agi_bitrix.ownership import unwritable_by
    from agi_bitrix.spill import spill_path

    try:
        st = state_dir.stat()
        files = [p for p in state_dir.iterdir() if p.is_file()]
    except OSError:
        return "", []  # the folder problem is reported on its own
    files += [p for p in (log_file.parent, log_file, spill_path(str(log_file))) if p.exists()]
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
        groups = os.getgrouplist(name, st.st_gid)
    except KeyError:
        name, groups = str(st.st_uid), [st.st_gid]
    return name, unwritable_by(files, st.st_uid, groups)


def _asterisk_can_write(report: Report, state_dir: Path, log_file: Path) -> None:
    user, bad = files_asterisk_cannot_write(state_dir, log_file)
    if not bad:
        return
    listed = ", ".join(str(p) for p in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    folders = " ".join(sorted({str(state_dir), str(log_file.parent)}))
    report.problem("state", f"the Asterisk user {user} cannot write {listed}: every call step would fail; "
                            f"run chown -R {user}: {folders}")


MIN_FREE_BYTES = 100 * 1024 * 1024  # below this the outbox may soon fail to record calls


def _disk_and_outbox(report: Report, state_dir: Path, log_file: Path) -> None:
    """Free space where the outbox lives, and what waits in it (or in the spill file)."""
    import shutil

    from agi_bitrix.spill import not_replayed, spill_path
    from agi_bitrix.store import Store, StoreError

    spill = spill_path(str(log_file))
    try:
        free = shutil.disk_usage(state_dir).free
    except OSError:
        return  # the folder problem was reported already
    if free < MIN_FREE_BYTES:
        report.problem("state", f"only {free // (1024 * 1024)} MiB free on the disk of {state_dir}: "
                                "call records cannot be kept when it is full; free some space")
    try:
        store = Store(str(state_dir))
    except StoreError as exc:
        report.problem("outbox", str(exc))
        _spilled(report, not_replayed(None, spill), spill, state_dir)
        return
    try:
        info = store.outbox_status()
        spilled = not_replayed(store, spill)
    finally:
        store.close()
    _spilled(report, spilled, spill, state_dir)
    counts = info["counts"]
    if counts["dead"]:
        report.problem("outbox", f"{counts['dead']} dead letter(s): see agi-bitrix outbox status, fix the "
                                 "cause, then agi-bitrix outbox retry")
    if counts["pending"]:
        age = int((time.time() - (info["oldest_pending"] or time.time())) // 60)
        report.warn("outbox", f"{counts['pending']} waiting for delivery, the oldest for {age} min "
                              f"(last error: {info['last_error'] or 'none'}); is the worker running?")
    elif not counts["dead"] and not spilled:
        report.ok("outbox", "nothing waiting")


def _spilled(report: Report, count: int, spill: Path, state_dir: Path) -> None:
    if count:
        report.problem("outbox", f"{count} call(s) kept in {spill} while {state_dir} could not be written: "
                                 f"once it can, run agi-bitrix outbox replay {spill}")


def _bitrix(report: Report, settings: settings_mod.Settings) -> None:
    from agi_bitrix.bitrix.errors import AuthError, BitrixError, NetworkError
    from agi_bitrix.bitrix.factory import NotConfigured, make_client
    from agi_bitrix.placements.bind import report_widgets

    b24 = settings.bitrix24
    try:
        client = make_client(settings)
    except NotConfigured as exc:
        report.problem("bitrix24", str(exc))
        return
    client.timeout = max(b24.timeout, 5.0)  # a diagnosis may wait longer than a ringing caller
    host = urlsplit(b24.webhook_url or b24.portal_url).netloc
    oauth = b24.mode == "oauth"
    if oauth:
        _oauth_store(report, client.auth, host)
    started = time.monotonic()
    try:
        scopes = client.call("scope") or []
    except NetworkError as exc:
        report.problem("bitrix24", f"{host} cannot be reached: {exc.description or exc.code}")
        return
    except AuthError as exc:
        if exc.code == "TOKEN_STORE":  # the token file or its disk, not the portal
            report.problem("oauth", exc.description)
            return
        if oauth:
            report.problem("bitrix24", f"{host} refused the OAuth token ({exc.code}): "
                                       f"{exc.description if exc.code.lower() == 'invalid_grant' else _REAUTH}")
        else:
            report.problem("bitrix24", f"{host} refused the webhook ({exc.code}): create a new inbound webhook "
                                       "and put its URL into [bitrix24] webhook_url")
        return
    except BitrixError as exc:
        report.problem("bitrix24", f"{host}: {exc.summary()}")
        return
    ms = int((time.monotonic() - started) * 1000)
    missing = missing_scopes(scopes)
    report.ok("bitrix24", f"{host} answered in {ms} ms ({b24.mode} mode)")
    if oauth:
        renewed = " (renewed just now)" if getattr(client.auth, "refreshed", False) else ""
        report.ok("oauth", f"the access token works{renewed}")
    kind, fix = (("application", "tick them in the local application's settings in Bitrix24, save, "
                                 "and run agi-bitrix auth --code CODE again") if oauth else
                 ("webhook", "edit the webhook in Bitrix24 and tick them"))
    required = [s for s in missing if s in REQUIRED_SCOPES]
    if required:
        report.problem("bitrix24", f"the {kind} lacks the scope(s) {', '.join(required)}: {fix}")
    else:
        report.ok("bitrix24", f"scopes present: {', '.join(REQUIRED_SCOPES)}")
    later = [s for s in missing if s in DIALER_SCOPES]
    if later:
        report.warn("bitrix24", f"the {kind} lacks the scope(s) {', '.join(later)} the auto-dialer needs: {fix}")
    report_widgets(report, client, settings, scopes)
    if "user" in missing:
        return
    employees = _employees(client, report)
    if employees is None:
        return
    if employees:
        listed = ", ".join(f"{inner} {name}" for inner, name in sorted(employees.items())[:20])
        more = f" and {len(employees) - 20} more" if len(employees) > 20 else ""
        report.ok("employees", f"{len(employees)} with inner numbers: {listed}{more}")
    else:
        report.problem("employees", "no active employee has an inner number: fill in 'Internal phone' "
                                    "(UF_PHONE_INNER) in the employees' profiles")
    default = settings.calls.default_user
    if not default:
        report.problem("calls", "[calls] default_user is empty: set the inner number of whoever takes unclaimed calls")
    elif default not in employees:
        report.problem("calls", f"[calls] default_user {default} is no active employee's inner number")
    else:
        report.ok("calls", f"default_user {default} is {employees[default]}")


_REAUTH = ("the application may have been removed or reinstalled: run agi-bitrix auth --code CODE again")


def _oauth_store(report: Report, auth: Any, host: str) -> None:
    tokens = auth.tokens
    report.secrets += [tokens.access_token, tokens.refresh_token]
    portal = urlsplit(tokens.client_endpoint).netloc
    report.ok("oauth", f"tokens in {auth.store.path} for {portal} (member_id {tokens.member_id or '?'})")
    if portal != host:
        report.warn("oauth", f"the tokens belong to {portal} but [bitrix24] portal_url names {host}")
    if tokens.refused:
        report.problem("oauth", f"the OAuth server refused the refresh token ({tokens.refused}): run "
                                "agi-bitrix auth --code CODE again")


def _employees(client: Any, report: Report) -> Optional[Dict[str, str]]:
    from agi_bitrix.bitrix.errors import BitrixError

    found: Dict[str, str] = {}
    start = 0
    for _ in range(20):  # 1000 employees is plenty for a check
        try:
            body = client.call_raw("user.get", {"FILTER": {"ACTIVE": "true", "!UF_PHONE_INNER": ""}, "start": start})
        except BitrixError as exc:
            report.problem("employees", f"cannot list employees: {exc.summary()}")
            return None
        for row in body.get("result") or []:
            inner = str(row.get("UF_PHONE_INNER") or "").strip()
            if inner:
                found[inner] = " ".join(p for p in (row.get("NAME"), row.get("LAST_NAME")) if p) or f"user {row.get('ID')}"
        if "next" not in body:
            break
        start = int(body["next"])
    return found


def _ami(report: Report, settings: settings_mod.Settings) -> None:
    ast = settings.asterisk
    if not ast.ami_user:
        report.ok("asterisk", "AMI not configured (needed only for the dialer and click-to-call)")
        return
    try:
        with socket.create_connection((ast.ami_host, ast.ami_port), timeout=3) as sock:
            sock.settimeout(3)
            banner = sock.recv(200).decode("utf-8", "replace").strip()
    except OSError as exc:
        report.problem("asterisk", f"AMI {ast.ami_host}:{ast.ami_port} cannot be reached ({exc.strerror or exc}): "
                                   "enable it in manager.conf")
        return
    if banner.startswith("Asterisk Call Manager"):
        report.ok("asterisk", f"AMI {ast.ami_host}:{ast.ami_port} answered: {banner}")
    else:
        report.problem("asterisk", f"{ast.ami_host}:{ast.ami_port} is not an AMI port (it said {banner[:40]!r})")


def _service(report: Report, settings: settings_mod.Settings) -> None:
    """Is `agi-bitrix service` up, and ready? Asked through its /healthz on [events] listen."""
    import json
    import urllib.error
    import urllib.request

    host, _, port = settings.events.listen.rpartition(":")
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read(10000)
    except urllib.error.HTTPError as exc:
        body = exc.read(10000)
    except OSError:
        report.warn("service", f"agi-bitrix service is not running ({settings.events.listen}): every call step "
                               "starts a process of its own, fine for a few calls at once")
        return
    try:
        answer = json.loads(body)
        reasons = {k: v for k, v in answer["reasons"].items() if v}
    except (ValueError, KeyError, TypeError, AttributeError):
        report.warn("service", f"{settings.events.listen} is not agi-bitrix service (agi-bitrix serve?)")
        return
    if answer.get("ready") and not reasons:
        report.ok("service", f"agi-bitrix service is ready: FastAGI on {settings.service.fastagi}")
    else:
        report.problem("service", "agi-bitrix service is not ready: "
                       + "; ".join(f"{k}: {v}" for k, v in sorted(reasons.items())))


def run(args: Any) -> int:
    report = Report()
    path = settings_mod.settings_path(getattr(args, "settings", None))
    try:
        settings = settings_mod.load(str(path))
    except settings_mod.SettingsError as exc:
        report.problem("settings", str(exc))
        print(f"agi-bitrix check: {exc}", file=sys.stderr)
        return 1
    report.secrets = settings.secrets()
    report.ok("settings", f"{path} read ({settings.bitrix24.mode} mode)")
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            report.warn("settings", f"{path} is readable by other users and holds secrets: chmod 600 {path}")
    except OSError:
        pass
    _writable_dir(report, "state", Path(settings.storage.state_dir))
    _writable_dir(report, "log", Path(settings.logging.file).parent)
    # Run as root, opening the database hands it to the Asterisk user before the ownership check.
    _disk_and_outbox(report, Path(settings.storage.state_dir), Path(settings.logging.file))
    _asterisk_can_write(report, Path(settings.storage.state_dir), Path(settings.logging.file))
    _bitrix(report, settings)
    _ami(report, settings)
    _service(report, settings)
    if report.problems:
        first = report.problems[0]
        for secret in report.secrets:
            first = first.replace(secret, "***")
        print(f"agi-bitrix check: {len(report.problems)} problem(s); first: {first}", file=sys.stderr)
        return 1
    print("all good")
    return 0
