"""`agi-bitrix check`: read the settings, reach Bitrix24 and Asterisk, say plainly what is wrong.

Every problem is one line naming what is wrong and the command or setting that fixes it.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from agi_bitrix import settings as settings_mod
from agi_bitrix.admin_texts import Texts, choose_language
from agi_bitrix.commands import access
from agi_bitrix.commands.recent import recent_steps

REQUIRED_SCOPES = ("telephony", "crm", "user")  # without these no call reaches the CRM
DIALER_SCOPES = ("task", "im", "sonet_group")    # the auto-dialer: tasks, notices, workgroups
NEEDED_SCOPES = REQUIRED_SCOPES + DIALER_SCOPES
DEFAULT_AGI_BIN = "/var/lib/asterisk/agi-bin"    # astagidir of a stock asterisk.conf
# AMI actions the dialer and click-to-call send (Asterisk main/manager.c registers Originate with
# the `originate` write class and ExtensionState with `call` or `reporting`).
AMI_ACTIONS = ("Originate", "ExtensionState")


def missing_scopes(present: Any) -> List[str]:
    have = set(present or ())
    if "user_basic" in have:  # the level Bitrix24 REST docs name for calling scenarios
        have.add("user")
    return [scope for scope in NEEDED_SCOPES if scope not in have]


class Report:
    def __init__(self, texts: Texts) -> None:
        self.t = texts
        self.problems: List[str] = []
        self.secrets: List[str] = []

    def _say(self, tag: str, area: str, text: str) -> None:
        print(f"{self.t(tag):<8} {area:<10} {self._clean(text)}")

    def _clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def ok(self, area: str, template: str, **values: Any) -> None:
        self._say("OK", area, self.t(template, **values))

    def warn(self, area: str, template: str, **values: Any) -> None:
        self._say("WARNING", area, self.t(template, **values))

    def problem(self, area: str, template: str, **values: Any) -> None:
        text = self.t(template, **values)
        self._say("PROBLEM", area, text)
        self.problems.append(self._clean(f"{area}: {text}"))


def _settings_access(report: Report, path: Path, user: Optional[access.User]) -> None:
    """Can the Asterisk user read the settings? Check runs as root and would not notice."""
    if user is None or user.uid == 0:
        return
    blocked = access.first_unenterable(path.parent, user)
    if blocked is not None:
        report.problem("settings", "the Asterisk user {user} cannot enter the folder {path}: as root run "
                       "chmod o+x {path} (or chgrp {user} {path}; chmod g+x {path})", user=user.name, path=blocked)
    elif path.exists() and not access.allows(path, user, os.R_OK):
        report.problem("settings", "the Asterisk user {user} cannot read {path}: as root run chown {user} {path}; "
                       "chmod 600 {path}", user=user.name, path=path)


def _agi_script(report: Report, agi_bin: Path, explicit: bool, user: Optional[access.User]) -> None:
    """The script Asterisk runs: there, executable, and its interpreter still importing agi_bitrix."""
    script = agi_bin / "agi-bitrix"
    entry = Path(sys.executable).with_name("agi-bitrix")
    if not agi_bin.is_dir() and not explicit:
        report.ok("agi", "{path} not found: pass --agi-bin DIR (Asterisk's astagidir) to check the AGI script",
                  path=agi_bin)
        return
    if not script.is_file():
        report.problem("agi", "{path} is missing: run agi-bitrix install --agi-bin {folder} again",
                       path=script, folder=agi_bin)
        return
    who = user or access.current_user()
    if not access.allows(script, who, os.X_OK | os.R_OK):
        report.problem("agi", "{path} is not executable by the Asterisk user {user}: chmod 755 {path}",
                       path=script, user=who.name)
        return
    try:
        first = script.read_bytes().split(b"\n", 1)[0].decode("utf-8", "replace")
    except OSError:
        first = ""
    python = first[2:].strip().split(" ")[0] if first.startswith("#!") else ""
    if not python:
        return
    if not os.access(python, os.X_OK):
        report.problem("agi", "{path} runs {python}, which no longer exists (the virtual environment moved?): "
                       "run {entry} install --agi-bin {folder} again", path=script, python=python, entry=entry,
                       folder=agi_bin)
        return
    try:
        works = subprocess.run([python, "-c", "import agi_bitrix"], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    if not works:
        report.problem("agi", "{path} runs {python}, which cannot import agi_bitrix: run {entry} install "
                       "--agi-bin {folder} again", path=script, python=python, entry=entry, folder=agi_bin)
    else:
        report.ok("agi", "{path} runs {python}", path=script, python=python)


def _folder(report: Report, area: str, folder: Path) -> None:
    """A folder install created: missing means install did not run (or was undone); never create it
    here, as root, with the wrong owner."""
    if not folder.is_dir():
        ancestor = next(p for p in folder.absolute().parents if p.exists())
        if ancestor.is_dir() and not folder.exists():
            report.problem(area, "{path} does not exist: run agi-bitrix install again", path=folder)
        else:  # a file where a folder should be: install cannot fix that
            report.problem(area, "{path} is not writable by this user ({reason}); it must be writable by the user "
                           "Asterisk runs as", path=folder, reason=os.strerror(errno.ENOTDIR))
        return
    probe = folder / f".check-{os.getpid()}"
    try:
        probe.write_text("x")
        probe.unlink()
        report.ok(area, "{path} is writable", path=folder)
    except OSError as exc:
        report.problem(area, "{path} is not writable by this user ({reason}); it must be writable by the user "
                       "Asterisk runs as", path=folder, reason=exc.strerror)


def files_asterisk_cannot_write(state_dir: Path, log_file: Path) -> Tuple[str, List[Path]]:
    """The Asterisk user (the owner of state_dir, as `install` made it) and the files in state_dir
    and the log it cannot write: each one fails every call step run by Asterisk."""
    import pwd

    from agi_bitrix.ownership import unwritable_by
    from agi_bitrix.settings_file import CACHE_FILE
    from agi_bitrix.spill import spill_path

    try:
        st = state_dir.stat()
        # The settings cache is replaced, never written in place: the folder's right is what counts.
        files = [p for p in state_dir.iterdir() if p.is_file() and p.name != CACHE_FILE]
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
    listed = ", ".join(str(p) for p in bad[:5]) + (report.t(" and {count} more", count=len(bad) - 5)
                                                   if len(bad) > 5 else "")
    folders = " ".join(sorted({str(state_dir), str(log_file.parent)}))
    report.problem("state", "the Asterisk user {user} cannot write {listed}: every call step would fail; "
                   "run chown -R {user}: {folders}", user=user, listed=listed, folders=folders)


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
        report.problem("state", "only {mib} MiB free on the disk of {path}: call records cannot be kept when it "
                       "is full; free some space", mib=free // (1024 * 1024), path=state_dir)
    try:
        store = Store(str(state_dir))
    except StoreError as exc:
        report.problem("outbox", "{reason}", reason=report.t.translate(str(exc)))
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
        report.problem("outbox", "{count} dead letter(s): see agi-bitrix outbox status, fix the cause, then "
                       "agi-bitrix outbox retry", count=counts["dead"])
    if counts["pending"]:
        age = int((time.time() - (info["oldest_pending"] or time.time())) // 60)
        report.warn("outbox", "{count} waiting for delivery, the oldest for {age} min (last error: {error}); "
                    "is the worker running?", count=counts["pending"], age=age,
                    error=info["last_error"] or report.t("none"))
    elif not counts["dead"] and not spilled:
        report.ok("outbox", "nothing waiting")


def _shared_store(report: Report, settings: settings_mod.Settings) -> None:
    """The PostgreSQL store several PBXs share: reachable, its schema, this PBX's name, the others."""
    storage = settings.storage
    if not storage.url:
        return
    try:
        from agi_bitrix.shared import schema
        from agi_bitrix.shared.connect import connect, identity, where
        from agi_bitrix.shared.deliver import ALIVE, duplicate, others
        from agi_bitrix.shared.store import PgStore
    except ImportError:
        report.problem("store", "[storage] url needs psycopg: pip install 'agi-bitrix[postgresql]'")
        return
    from agi_bitrix.shared.journal import open_local, waiting
    from agi_bitrix.store import StoreError

    try:
        store = PgStore(storage.url, storage.pbx_id, conn=connect(storage.url, storage.pbx_id, 10.0))
    except StoreError as exc:
        report.problem("store", "{reason}", reason=report.t.translate(str(exc)))
        return
    try:
        now = time.time()
        mine = store._one("SELECT identity, seen_at FROM pbxs WHERE pbx = %s", (storage.pbx_id,))
        if mine is not None and mine["identity"] != identity(storage.state_dir) and now - mine["seen_at"] < ALIVE:
            report.problem("store", "{reason}", reason=report.t.translate(duplicate(storage.pbx_id, mine["identity"])))
        report.ok("store", "shared store PostgreSQL at {where}, schema version {version}, this PBX is {pbx}",
                  where=where(storage.url), version=schema.LATEST, pbx=storage.pbx_id)
        pending = store.outbox_status()["counts"]["pending"]
        if pending:
            report.warn("store", "{count} entr(y/ies) of this PBX wait in the shared store for delivery: is a "
                        "worker running on some PBX?", count=pending)
        seen = [f"{row['pbx']} ({int(now - row['seen_at'])} s ago)" for row in others(store)]
        if seen:
            report.ok("store", "other PBXs in it: {pbxs}", pbxs=", ".join(seen))
        else:
            report.ok("store", "no other PBX has used it yet")
    finally:
        store.close()
    try:
        local = open_local(storage.state_dir, storage.pbx_id)
    except StoreError:
        return  # the outbox line named it
    try:
        kept = waiting(local)
    finally:
        local.close()
    if kept:
        report.warn("store", "{count} call(s) kept in the local journal while the shared store was away: the "
                    "worker moves them (or agi-bitrix outbox flush)", count=len(kept))


def _spilled(report: Report, count: int, spill: Path, state_dir: Path) -> None:
    if count:
        report.problem("outbox", "{count} call(s) kept in {spill} while {path} could not be written: once it can, "
                       "run agi-bitrix outbox replay {spill}", count=count, spill=spill, path=state_dir)


def _recent_calls(report: Report, log_file: Path) -> None:
    """Calls failing right now: the ERROR steps of the last hour in the log, and the last reason."""
    steps = recent_steps(log_file, within=3600.0)
    if not steps:
        return
    errors = [s for s in steps if s.get("status") == "ERROR"]
    if errors:
        last = errors[-1]
        report.problem("calls", "{errors} of {steps} call steps in the last hour ended in ERROR; the last "
                       "({event} at {time}): {reason}", errors=len(errors), steps=len(steps),
                       event=last.get("event", "?"), time=str(last.get("time", ""))[11:19],
                       reason=report.t.translate(str(last.get("reason") or "?")))
    else:
        report.ok("calls", "{steps} call steps in the last hour, none failed", steps=len(steps))


_NETWORK_FIX = {
    "dns": "{host} cannot be reached: {reason}: check the address in [bitrix24] {key} and the PBX's DNS "
           "(/etc/resolv.conf)",
    "refused": "{host} cannot be reached: {reason}: check the address in [bitrix24] {key}; a firewall or proxy "
               "may block the PBX",
    "tls": "{host} cannot be reached: {reason}: check the PBX's clock and CA certificates "
           "(apt install ca-certificates)",
}


def _bitrix(report: Report, settings: settings_mod.Settings) -> None:
    from agi_bitrix.bitrix.errors import AuthError, BitrixError, NetworkError
    from agi_bitrix.bitrix.factory import NotConfigured, make_client
    from agi_bitrix.placements.bind import report_widgets

    b24 = settings.bitrix24
    t = report.t
    try:
        client = make_client(settings)
    except NotConfigured as exc:
        report.problem("bitrix24", "{reason}", reason=t.translate(str(exc)))
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
        key = "portal_url" if oauth else "webhook_url"
        report.problem("bitrix24", _NETWORK_FIX.get(exc.cause, "{host} cannot be reached: {reason}"),
                       host=host, reason=exc.description or exc.code, key=key)
        return
    except AuthError as exc:
        if exc.code == "TOKEN_STORE":  # the token file or its disk, not the portal
            report.problem("oauth", "{reason}", reason=t.translate(exc.description))
            return
        if oauth:
            fix = exc.description if exc.code.lower() == "invalid_grant" else t(_REAUTH)
            report.problem("bitrix24", "{host} refused the OAuth token ({code}): {fix}", host=host,
                           code=exc.code, fix=fix)
        else:
            report.problem("bitrix24", "{host} refused the webhook ({code}): create a new inbound webhook and "
                           "put its URL into [bitrix24] webhook_url", host=host, code=exc.code)
        return
    except BitrixError as exc:
        report.problem("bitrix24", "{host}: {summary}", host=host, summary=exc.summary())
        return
    ms = int((time.monotonic() - started) * 1000)
    missing = missing_scopes(scopes)
    report.ok("bitrix24", "{host} answered in {ms} ms ({mode} mode)", host=host, ms=ms, mode=b24.mode)
    if oauth:
        renewed = t(" (renewed just now)") if getattr(client.auth, "refreshed", False) else ""
        report.ok("oauth", "the access token works{renewed}", renewed=renewed)
    kind, fix = (("application", "tick them in the local application's settings in Bitrix24, save, and run "
                                 "agi-bitrix auth --code CODE again") if oauth else
                 ("webhook", "edit the webhook in Bitrix24 and tick them"))
    kind, fix = t(kind), t(fix)
    required = [s for s in missing if s in REQUIRED_SCOPES]
    if required:
        report.problem("bitrix24", "the {kind} lacks the scope(s) {scopes}: {fix}", kind=kind,
                       scopes=", ".join(required), fix=fix)
    else:
        report.ok("bitrix24", "scopes present: {scopes}", scopes=", ".join(REQUIRED_SCOPES))
    later = [s for s in missing if s in DIALER_SCOPES]
    if later:
        report.warn("bitrix24", "the {kind} lacks the scope(s) {scopes} the auto-dialer needs: {fix}", kind=kind,
                    scopes=", ".join(later), fix=fix)
    report_widgets(report, client, settings, scopes)
    if "user" in missing:
        return
    employees = _employees(client, report)
    if employees is None:
        return
    if employees:
        listed = ", ".join(f"{inner} {name}" for inner, name in sorted(employees.items())[:20])
        more = t(" and {count} more", count=len(employees) - 20) if len(employees) > 20 else ""
        report.ok("employees", "{count} with inner numbers: {listed}{more}", count=len(employees), listed=listed,
                  more=more)
    else:
        report.problem("employees", "no active employee has an inner number: fill in 'Internal phone' "
                       "(UF_PHONE_INNER) in the employees' profiles")
    default = settings.calls.default_user
    if not default:
        report.problem("calls", "[calls] default_user is empty: set the inner number of whoever takes unclaimed calls")
    elif default not in employees:
        report.problem("calls", "[calls] default_user {inner} is no active employee's inner number", inner=default)
    else:
        report.ok("calls", "default_user {inner} is {name}", inner=default, name=employees[default])


_REAUTH = "the application may have been removed or reinstalled: run agi-bitrix auth --code CODE again"


def _oauth_store(report: Report, auth: Any, host: str) -> None:
    tokens = auth.tokens
    report.secrets += [tokens.access_token, tokens.refresh_token]
    portal = urlsplit(tokens.client_endpoint).netloc
    where = getattr(auth.store, "label", auth.store.path)  # the shared store names itself
    report.ok("oauth", "tokens in {path} for {portal} (member_id {member})", path=where, portal=portal,
              member=tokens.member_id or "?")
    if portal != host:
        report.warn("oauth", "the tokens belong to {portal} but [bitrix24] portal_url names {host}", portal=portal,
                    host=host)
    if tokens.refused:
        report.problem("oauth", "the OAuth server refused the refresh token ({reason}): run agi-bitrix auth "
                       "--code CODE again", reason=tokens.refused)


def _employees(client: Any, report: Report) -> Optional[Dict[str, str]]:
    from agi_bitrix.bitrix.errors import BitrixError

    found: Dict[str, str] = {}
    start = 0
    for _ in range(20):  # 1000 employees is plenty for a check
        try:
            body = client.call_raw("user.get", {"FILTER": {"ACTIVE": "true", "!UF_PHONE_INNER": ""}, "start": start})
        except BitrixError as exc:
            report.problem("employees", "cannot list employees: {summary}", summary=exc.summary())
            return None
        for row in body.get("result") or []:
            inner = str(row.get("UF_PHONE_INNER") or "").strip()
            if inner:
                found[inner] = " ".join(p for p in (row.get("NAME"), row.get("LAST_NAME")) if p) or f"user {row.get('ID')}"
        if "next" not in body:
            break
        start = int(body["next"])
    return found


def _ami_banner(report: Report, host: str, port: int) -> Optional[str]:
    """Reach the port and read the greeting; None (after saying why) when it is not an AMI."""
    try:
        with socket.create_connection((host, port), timeout=3) as sock:
            sock.settimeout(3)
            try:
                banner = sock.recv(200).decode("utf-8", "replace").strip()
            except socket.timeout:
                banner = ""
    except socket.gaierror:
        report.problem("asterisk", "AMI host {host} does not resolve (DNS): set [asterisk] ami_host to the "
                       "Asterisk host, usually 127.0.0.1", host=host)
        return None
    except ConnectionRefusedError:
        report.problem("asterisk", "nothing listens on {host}:{port}: enable AMI in manager.conf ([general] "
                       "enabled = yes, port = {port}), then asterisk -rx 'manager reload'", host=host, port=port)
        return None
    except OSError as exc:
        report.problem("asterisk", "AMI {host}:{port} cannot be reached ({reason}): check [asterisk] ami_host and "
                       "ami_port", host=host, port=port, reason=exc.strerror or type(exc).__name__)
        return None
    # Asterisk greets first with "Asterisk Call Manager/<version>" (main/manager.c).
    if not banner.startswith("Asterisk Call Manager/"):
        said = repr(banner[:40]) if banner else report.t("nothing")
        report.problem("asterisk", "{host}:{port} answers but is not AMI (it said {said}): set [asterisk] ami_port "
                       "to the port in manager.conf [general] (5038 by default)", host=host, port=port, said=said)
        return None
    return banner


def _ami_rights(client: Any) -> Tuple[str, ...]:
    """Actions of AMI_ACTIONS this user may not run. Asterisk's ListCommands lists only the actions
    the logged-in user's write classes allow (main/manager.c action_listcommands)."""
    reply = client.action("ListCommands")
    allowed = {name.lower() for name, _ in reply.headers}
    return tuple(a for a in AMI_ACTIONS if a.lower() not in allowed)


def _ami(report: Report, settings: settings_mod.Settings) -> None:
    from agi_bitrix.pbx.ami import AMIAuthError, AMIClient, AMIError

    ast = settings.asterisk
    if not ast.ami_user:
        report.ok("asterisk", "AMI not configured (needed only for the dialer and click-to-call)")
        return
    host, port = ast.ami_host, ast.ami_port
    banner = _ami_banner(report, host, port)
    if banner is None:
        return
    client = AMIClient(host, port, ast.ami_user, ast.ami_secret, timeout=5.0, reconnect=False, events="off")
    try:
        client.connect()
        missing = _ami_rights(client)
    except AMIAuthError:
        report.problem("asterisk", "AMI refused the login of {user}: set [asterisk] ami_user and ami_secret to a "
                       "user of manager.conf and its secret (and let its permit= allow this host), then "
                       "asterisk -rx 'manager reload'", user=ast.ami_user)
        return
    except AMIError as exc:
        report.problem("asterisk", "AMI {host}:{port}: {reason}", host=host, port=port, reason=str(exc))
        return
    finally:
        client.close()
    if missing:
        report.problem("asterisk", "AMI user {user} may not run {actions} (the dialer and click-to-call need "
                       "them): in manager.conf [{user}] set write = originate,call and read = call, then "
                       "asterisk -rx 'manager reload'", user=ast.ami_user, actions=", ".join(missing))
    else:
        report.ok("asterisk", "AMI {host}:{port} answered ({banner}); {user} may originate calls", host=host,
                  port=port, banner=banner, user=ast.ami_user)


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
        report.warn("service", "agi-bitrix service is not running ({listen}): every call step starts a process "
                               "of its own, fine for a few calls at once", listen=settings.events.listen)
        return
    try:
        answer = json.loads(body)
        reasons = {k: v for k, v in answer["reasons"].items() if v}
    except (ValueError, KeyError, TypeError, AttributeError):
        report.warn("service", "{listen} is not agi-bitrix service (agi-bitrix serve?)", listen=settings.events.listen)
        return
    if answer.get("ready") and not reasons:
        report.ok("service", "agi-bitrix service is ready: FastAGI on {fastagi}", fastagi=settings.service.fastagi)
    else:
        report.problem("service", "agi-bitrix service is not ready: {reasons}",
                       reasons="; ".join(f"{k}: {v}" for k, v in sorted(reasons.items())))


def run(args: Any) -> int:
    lang = getattr(args, "lang", None)
    report = Report(Texts(choose_language(lang)))
    path = settings_mod.settings_path(getattr(args, "settings", None))
    agi_bin = Path(getattr(args, "agi_bin", None) or DEFAULT_AGI_BIN)
    user = access.asterisk_user(agi_bin)
    _settings_access(report, path, user)
    try:
        settings = settings_mod.load(str(path))
    except settings_mod.SettingsError as exc:
        message = report.t.translate(str(exc))
        report.problem("settings", "{reason}", reason=message)
        print(report.t("agi-bitrix {command}: {message}", command="check", message=message), file=sys.stderr)
        return 1
    report.t = Texts(choose_language(lang, settings.logging.language))
    report.secrets = settings.secrets()
    report.ok("settings", "{path} read ({mode} mode)", path=path, mode=settings.bitrix24.mode)
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            report.warn("settings", "{path} is readable by other users and holds secrets: chmod 600 {path}", path=path)
    except OSError:
        pass
    state_dir, log_file = Path(settings.storage.state_dir), Path(settings.logging.file)
    if user is None:  # no agi-bin here: install made the state folder the Asterisk user's too
        user = access.owner_of(state_dir)
        _settings_access(report, path, user)
    _agi_script(report, agi_bin, bool(getattr(args, "agi_bin", None)), user)
    _folder(report, "state", state_dir)
    _folder(report, "log", log_file.parent)
    # Run as root, opening the database hands it to the Asterisk user before the ownership check.
    _disk_and_outbox(report, state_dir, log_file)
    _shared_store(report, settings)
    _asterisk_can_write(report, state_dir, log_file)
    _recent_calls(report, log_file)
    _bitrix(report, settings)
    _ami(report, settings)
    _service(report, settings)
    if report.problems:
        print(report.t("agi-bitrix check: {count} problem(s); first: {first}", count=len(report.problems),
                       first=report.problems[0]), file=sys.stderr)
        return 1
    print(report.t("all good"))
    return 0
