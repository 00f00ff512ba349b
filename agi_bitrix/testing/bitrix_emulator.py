"""A Bitrix24 cloud portal on 127.0.0.1, for tests and ``agi-bitrix demo``.

It is a real HTTP server (standard library only) speaking the parts of the Bitrix24 REST API this
project uses: webhook and OAuth auth, the rotating OAuth token endpoint, ``telephony.externalcall.*``
and ``telephony.externalLine.*``, ``user.get``, CRM look-ups, workgroups (``sonet_group.*``), tasks
(``tasks.task.*``, ``task.commentitem.add``), ``im.notify*``, ``timeman.status`` and ``batch``, plus
the leaky-bucket and operating limits and fault injection. It also plays the portal's side of REST
events: ``event.bind``/``get``/``unbind``, the offline queue (``event.offline.get``/``clear``/``error``),
the application's installation callback and the click-to-call / website-callback events, which it
POSTs form-encoded to bound handlers on loopback (it never reaches out to the internet). Several
applications may live on the portal (``add_application``): every token belongs to one, refreshes
only with that application's client_id, and ``app.info`` / ``user.admin`` answer for the token's
application and user, so an installation callback can be proven as on a real portal.
Widgets (``placement.*``, ``user.current`` and the form a placement frame gets) live in
emulator_placements.py.
Where the public facts are unsure it is deliberately strict (the harsher behaviour), so a client bug
shows up here instead of on a customer's portal.

Tests start it in-process, point the real ``agi-bitrix`` script at ``webhook_url`` (or the OAuth
endpoints) and then read ``calls``, ``leads``, ``tasks``, ``requests`` ... which are deep copies taken
under one lock. The portal's time zone is UTC+03:00: task dates come back with that offset.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import copy
import errno
import hashlib
import json
import os
import random
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

from agi_bitrix.bitrix.query import parse_php_pairs, parse_php_query
from agi_bitrix.testing.emulator_placements import PLACEMENT_METHODS, PlacementsMixin

__all__ = ["Bitrix24Emulator", "ApiError", "parse_php_query", "parse_php_pairs", "DEFAULT_SCOPES"]

DEFAULT_SCOPES = ("telephony", "crm", "user", "task", "im", "sonet_group", "timeman", "basic",
                  "placement", "department")

PAGE_SIZE = 50
DEDUP_WINDOW = 30 * 60          # register de-duplication window, seconds
BATCH_MAX = 50
CODE_TTL = 30                   # authorization code lifetime
ACCESS_TTL = 3600
REFRESH_TTL = 180 * 86400
FINDBYCOMM_MAX = 20
OFFLINE_LIMIT = 50              # event.offline.get batch size (default, and the most one call returns)
DELIVERY_TIMEOUT = 5.0          # seconds an online event delivery waits for the handler
# Stable portal id, like the real member_id that survives domain renames.
MEMBER_ID = hashlib.md5(b"agi-bitrix-emulator-portal").hexdigest()

_CRM_TYPES = ("CONTACT", "COMPANY", "LEAD")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Events this portal knows -> the scope an application needs to see (and bind) them; None = any app.
_EVENTS: dict[str, str | None] = {"ONEXTERNALCALLSTART": "telephony", "ONEXTERNALCALLBACKSTART": "telephony",
                                  "ONAPPINSTALL": None, "ONAPPUNINSTALL": None, "ONCRMLEADADD": "crm"}
_OFFLINE_FIELDS = ("ID", "TIMESTAMP_X", "EVENT_NAME", "MESSAGE_ID")  # documented filter/order fields
_OFFLINE_FILTER_KEY = re.compile(r"^(!=|>=|<=|!|=|>|<)?([A-Za-z_]+)$")
_PHONE_DROP = re.compile(r"[^0-9#*+,;]")
_ATOM = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})([+-])(\d{2}):(\d{2})$")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_RESULT_REF = re.compile(r"\$result\[([^\[\]]*)\]((?:\[[^\[\]]*\])*)")
_FILTER_KEY = re.compile(r"^(!@|!=|!%|>=|<=|@|!|=|>|<|%)?(.+)$")
_TASK_FILTER_KEY = re.compile(r"^(!=|>=|<=|!|=|>|<|%)?([A-Z][A-Z_]*)$")  # UPPER_CASE only (the quirk)
_ISO_NAIVE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")
_CRM_BINDING = re.compile(r"^(?:L|D|C|CO|SI|T[0-9a-f]+)_[1-9]\d*$")

PORTAL_TZ = timezone(timedelta(hours=3))  # portal time: offset-less task dates are read in it
LINE_NUMBER_MAX = 50

# tasks.task.* output fields (UPPER_CASE as requested in `select`, answered in camelCase). UF_CRM_TASK
# is left out of the default set: the portal returns it only when it is selected explicitly.
_TASK_FIELDS = ("ID", "PARENT_ID", "TITLE", "DESCRIPTION", "PRIORITY", "STATUS", "SUB_STATUS", "GROUP_ID",
                "CREATED_BY", "RESPONSIBLE_ID", "CHANGED_BY", "CREATED_DATE", "CHANGED_DATE", "CLOSED_DATE",
                "DEADLINE")
_TASK_UF = ("UF_CRM_TASK",)
_TASK_INT = {"ID", "PARENT_ID", "GROUP_ID", "RESPONSIBLE_ID", "CREATED_BY", "CHANGED_BY", "REAL_STATUS", "STATUS",
             "PRIORITY"}
_TASK_DATES = {"DEADLINE", "CREATED_DATE", "CHANGED_DATE", "CLOSED_DATE"}
_TASK_ORDER = _TASK_INT | _TASK_DATES | {"TITLE"}
_TASK_UPDATABLE = {"TITLE", "DESCRIPTION", "RESPONSIBLE_ID", "DEADLINE", "STATUS", "GROUP_ID", "UF_CRM_TASK",
                   "PRIORITY", "SE_PARAMETER"}
# Controller-style methods bind their parameters by exact (camelCase) name.
_TASK_PARAMS = {"tasks.task.list": {"filter", "select", "order", "start", "params"},
                "tasks.task.get": {"taskId", "select", "params"},
                "tasks.task.update": {"taskId", "fields", "params"},
                "tasks.task.complete": {"taskId", "params"}}
_TIMEMAN_STATES = ("OPENED", "CLOSED", "PAUSED", "EXPIRED", "UNAVAILABLE", "NOT_INSTALLED")
NOT_ALLOWED_TEXT = "Action on the task is not allowed"

NOT_FINISHED_TEXT = "Call is not found in the statistic table. It looks like it is not finished yet."
# Sic: the server's message lacks the closing parenthesis.
NOT_REGISTERED_TEXT = "Call is not found (call should be registered prior to finishing"


class ApiError(Exception):
    """An error answer: HTTP status plus the Bitrix24 error body."""

    def __init__(self, status: int, error: str, description: str = "", raw: bytes | None = None) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description
        self.raw = raw  # injected non-JSON body (e.g. an nginx error page)

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def _core(text: str) -> ApiError:
    return ApiError(400, "ERROR_CORE", text)


class _Page:
    """A list-method result: rows plus the top-level ``total`` / ``next``."""

    __slots__ = ("rows", "total", "next")

    def __init__(self, rows: list, total: int, next_: int | None) -> None:
        self.rows, self.total, self.next = rows, total, next_


class _Ctx:
    __slots__ = ("user_id", "auth", "in_batch", "app")

    def __init__(self, user_id: int, auth: str, in_batch: bool = False, app: str | None = None) -> None:
        # app: the client_id of the application an OAuth token was issued to (None for a webhook)
        self.user_id, self.auth, self.in_batch, self.app = user_id, auth, in_batch, app


# --------------------------------------------------------------------------- parsing helpers

def _parse_multipart(body: bytes, content_type: str) -> tuple[list[tuple[str, str]], dict[str, tuple[str, bytes]]]:
    """Split multipart/form-data into text fields and files (name -> (filename, bytes))."""
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.I)
    if not m:
        raise ValueError("multipart body without boundary")
    delimiter = b"--" + m.group(1).strip().encode("latin-1")
    fields: list[tuple[str, str]] = []
    files: dict[str, tuple[str, bytes]] = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        if part.startswith(b"\r\n"):
            part = part[2:]
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if data.endswith(b"\r\n"):
            data = data[:-2]
        disposition = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, val = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = val
        nm = re.search(r'(?:^|;)\s*name="([^"]*)"', disposition)
        fn = re.search(r'(?:^|;)\s*filename="([^"]*)"', disposition)
        if not nm:
            continue
        if fn is not None:
            files[nm.group(1)] = (fn.group(1), data)
        else:
            fields.append((nm.group(1), data.decode("utf-8", "replace")))
    return fields, files


def _php_int(value: Any) -> int:
    """PHP's (int) cast: leading digits of a string, 0 otherwise (so "N", "true" -> 0)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        m = re.match(r"\s*([+-]?\d+)", value)
        return int(m.group(1)) if m else 0
    return 0


def _php_str(value: Any) -> str:
    if value is True:
        return "1"
    if value is None or value is False:
        return ""
    if isinstance(value, (dict, list)):
        return "Array"
    return str(value)


def _yes(value: Any) -> bool:
    """Filter-style booleans: true / "Y" / "true" / 1."""
    if isinstance(value, str):
        return value.strip().upper() in ("Y", "TRUE", "1")
    return bool(value)


def _opt_str(value: Any) -> str:
    return "" if value is None else _php_str(value)


def sanitize_phone(value: Any) -> str:
    """What register/finish keep of a number: only ``0-9 # * + , ;``."""
    if value is None or isinstance(value, (bool, dict, list)):
        return ""
    return _PHONE_DROP.sub("", str(value))


def normalize_digits(value: Any) -> str:
    """CRM matching key: digits only, a leading 8 of an 11-digit number read as 7."""
    digits = re.sub(r"\D", "", "" if value is None else str(value))
    if len(digits) == 11 and digits.startswith("8"):
        digits = "7" + digits[1:]
    return digits


def _valid_atom(value: Any) -> bool:
    """Strict ISO 8601 / ATOM with an explicit ±HH:MM offset (no Z, no fractions)."""
    if not isinstance(value, str):
        return False
    m = _ATOM.match(value)
    if not m:
        return False
    try:
        datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return False
    return int(m.group(8)) <= 14 and int(m.group(9)) < 60


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).astimezone().isoformat(timespec="seconds")


def _portal_dt(ts: float) -> str:
    return time.strftime("%d.%m.%Y %H:%M:%S", time.localtime(ts))


def _portal_iso(ts: float) -> str:
    """ISO 8601 in portal time (+03:00), how tasks and timeman answer dates."""
    return datetime.fromtimestamp(ts, PORTAL_TZ).isoformat(timespec="seconds")


def _parse_iso(value: Any, naive_ok: bool = False) -> datetime | None:
    """Strict ISO 8601 with an offset -> aware datetime (None if not that). ``naive_ok`` also takes
    ``YYYY-MM-DDThh:mm:ss`` and reads it in portal time, as the portal does for task fields."""
    if not isinstance(value, str):
        return None
    if _valid_atom(value):
        return datetime.fromisoformat(value)
    if naive_ok and _ISO_NAIVE.match(value):
        try:
            return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=PORTAL_TZ)
        except ValueError:
            return None
    return None


def _camel(name: str) -> str:
    """RESPONSIBLE_ID -> responsibleId, UF_CRM_TASK -> ufCrmTask (tasks.task.* answer keys)."""
    head, *rest = name.lower().split("_")
    return head + "".join(w.capitalize() for w in rest)


def _php_list(value: Any) -> list | None:
    """A PHP array (JSON list, or a dict from ``a[0]=..``/``a[x]=..``) as a list; None if scalar."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.values())
    return None


def _crm_bindings(value: Any) -> list[str] | None:
    """UF_CRM_TASK input -> list of "C_12"-style strings; None when an item is malformed."""
    if value in (None, "", False):
        return []
    items = _php_list(value)
    items = [value] if items is None else items
    out: list[str] = []
    for item in items:
        text = _php_str(item)
        if not _CRM_BINDING.match(text):
            return None
        if text not in out:
            out.append(text)
    return out


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _int_list(value: Any) -> list[int]:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [i for i in (_php_int(v) for v in value) if i > 0]
    i = _php_int(value)
    return [i] if i > 0 else []


def _lookup(container: Any, key: Any) -> tuple[bool, Any]:
    if isinstance(container, dict):
        if key in container:
            return True, container[key]
        s = str(key)
        if s in container:
            return True, container[s]
        if re.fullmatch(r"-?\d+", s) and int(s) in container:
            return True, container[int(s)]
        return False, None
    if isinstance(container, list) and re.fullmatch(r"\d+", str(key)):
        i = int(key)
        if i < len(container):
            return True, container[i]
    return False, None


# --------------------------------------------------------------------------- method table

# method -> (scopes any of which allows it, None = always allowed; handler attribute)
_METHODS: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "scope": (None, "_m_scope"),
    "profile": (None, "_m_profile"),
    "methods": (None, "_m_methods"),
    "batch": (("basic",), "_m_batch_placeholder"),
    "app.info": (("basic",), "_m_app_info"),
    "user.admin": (("basic",), "_m_user_admin"),
    "user.get": (("user", "user_basic", "user_brief"), "_m_user_get"),
    "telephony.externalcall.register": (("telephony",), "_m_register"),
    "telephony.externalcall.show": (("telephony",), "_m_show"),
    "telephony.externalcall.hide": (("telephony",), "_m_hide"),
    "telephony.externalcall.finish": (("telephony",), "_m_finish"),
    "telephony.externalcall.attachrecord": (("telephony",), "_m_attach_record"),
    "telephony.externalcall.searchcrmentities": (("telephony",), "_m_search_crm"),
    "crm.duplicate.findbycomm": (("crm",), "_m_findbycomm"),
    "crm.lead.get": (("crm",), "_m_lead_get"),
    "crm.contact.get": (("crm",), "_m_contact_get"),
    "crm.company.get": (("crm",), "_m_company_get"),
    "telephony.externalline.add": (("telephony",), "_m_line_add"),
    "telephony.externalline.get": (("telephony",), "_m_line_get"),
    "telephony.externalline.update": (("telephony",), "_m_line_update"),
    "telephony.externalline.delete": (("telephony",), "_m_line_delete"),
    "sonet_group.get": (("sonet_group",), "_m_group_get"),
    "sonet_group.user.get": (("sonet_group",), "_m_group_user_get"),
    "tasks.task.list": (("task",), "_m_task_list"),
    "tasks.task.get": (("task",), "_m_task_get"),
    "tasks.task.update": (("task",), "_m_task_update"),
    "tasks.task.complete": (("task",), "_m_task_complete"),
    "task.commentitem.add": (("task",), "_m_comment_add"),
    "im.notify": (("im",), "_m_notify"),
    "im.notify.system.add": (("im",), "_m_notify_system"),
    "im.notify.personal.add": (("im",), "_m_notify_personal"),
    "timeman.status": (("timeman",), "_m_timeman_status"),
    "event.bind": (None, "_m_event_bind"),
    "event.get": (None, "_m_event_get"),
    "event.unbind": (None, "_m_event_unbind"),
    "event.offline.get": (None, "_m_offline_get"),
    "event.offline.clear": (None, "_m_offline_clear"),
    "event.offline.error": (None, "_m_offline_error"),
    "user.current": (("user", "user_basic", "user_brief"), "_m_user_current"),
    "placement.bind": (("placement",), "_m_placement_bind"),
    "placement.unbind": (("placement",), "_m_placement_unbind"),
    "placement.get": (("placement",), "_m_placement_get"),
}
# The docs call these application-only; public server code accepts webhooks too (Bitrix24 REST docs:
# telephony).
_APP_ONLY = {"telephony.externalcall.register", "telephony.externalcall.finish", "telephony.externalline.add",
             "telephony.externalline.get", "telephony.externalline.update", "telephony.externalline.delete"}
# The docs say these work only with application auth; unlike telephony nothing contradicts that, so a
# webhook always gets WRONG_AUTH_TYPE (ONEXTERNALCALLSTART cannot reach a webhook at all: Bitrix24
# REST docs, inbound webhooks).
_EVENT_METHODS = {"event.bind", "event.get", "event.unbind", "event.offline.get", "event.offline.clear",
                  "event.offline.error"}
# Legacy methods that bind arguments by position, so their body may be a JSON array (Bitrix24 REST docs:
# data encoding).
_POSITIONAL_BODY = {"task.commentitem.add"}
# Handlers that take the lock themselves (they do network I/O that must not hold it).
_SELF_LOCKING = {"telephony.externalcall.attachrecord"}


# --------------------------------------------------------------------------- the emulator

class Bitrix24Emulator(PlacementsMixin):
    """In-process fake of a Bitrix24 cloud portal's REST API (see module docstring)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, webhook_user_id: int = 1,
                 webhook_code: str = "emu-webhook-secret", client_id: str = "local.emu.app",
                 client_secret: str = "emu-client-secret", scopes: Iterable[str] = DEFAULT_SCOPES,
                 bucket_size: int | None = None, drain_per_second: float = 2.0,
                 allow_webhook_telephony: bool = True) -> None:
        self.host = host
        self._port = int(port)
        self.webhook_user_id = int(webhook_user_id)
        self.webhook_code = webhook_code
        self.client_id = client_id
        self.client_secret = client_secret
        self.scopes: list[str] = list(scopes)
        # False = register/finish/externalLine.* via webhook answer 403 WRONG_AUTH_TYPE, as the docs claim.
        self.allow_webhook_telephony = allow_webhook_telephony
        # Wall clock for everything time-based (dedup window, token expiry, bucket drain);
        # tests replace it to jump ahead without sleeping.
        self.clock: Callable[[], float] = time.time

        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self.connections_opened = 0  # TCP connections accepted (keep-alive reuse shows here)

        self._users: dict[int, dict] = {}
        self._crm: dict[str, dict[int, dict]] = {t: {} for t in _CRM_TYPES}
        self._crm_seq = {t: 0 for t in _CRM_TYPES}
        self._fm_seq = 0
        self._calls: dict[str, dict] = {}
        self._dedup: dict[tuple, tuple[str, float]] = {}
        self._seq = {"call": 0, "activity": 0, "stat": 0, "file": 0, "task": 0, "comment": 0, "notify": 0,
                     "line": 0}
        self._groups: dict[int, dict] = {}
        self._tasks: dict[int, dict] = {}
        self._comments: dict[int, list[dict]] = {}
        self._notifications: list[dict] = []
        self._lines: dict[str, dict] = {}
        self._uploads: dict[str, dict] = {}
        self._requests: list[dict] = []
        self._faults: list[dict] = []
        self._hooks: dict[str, Callable[[], None]] = {}
        self._delays: list[dict] = []
        self._gates: dict[str, threading.Event] = {}  # method -> requests wait until it is set
        self._gate_counts: dict[str, int | None] = {}  # method -> how many more requests it holds
        self._bucket_size = bucket_size
        self._drain = float(drain_per_second)
        self._bucket_level = 0.0
        self._bucket_at: float | None = None
        self._operating_limits: dict[str, float] = {}
        self._operating_used: dict[str, float] = {}
        self._operating_resets: dict[str, float] = {}
        self._access: dict[str, dict] = {}
        self._refresh: dict[str, dict] = {}
        self._codes: dict[str, float] = {}
        # Applications installed on this portal: client_id -> client_secret. Every token belongs to one;
        # the first is "the" application (events, lines, installation callback).
        self._apps: dict[str, str] = {client_id: client_secret}

        # REST events: the single installed application's bindings, offline queue and deliveries.
        self.application_token = secrets.token_hex(16)  # per-app secret in every event's auth[application_token]
        self.member_id = MEMBER_ID
        self.delivery_timeout = DELIVERY_TIMEOUT
        self._bindings: list[dict] = []
        self._offline: list[dict] = []
        self._deliveries: list[dict] = []
        self._delivered = threading.Condition(self._lock)
        self._seq.update({"handler": 0, "offline": 0})

        self._placements_init()
        self.count_503 = 0
        self.refresh_count = 0
        self.spent_refresh_uses = 0
        # Tracebacks of emulator bugs (answered as 500); tests can assert it stays empty.
        self.internal_errors: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Bitrix24Emulator:
        """Bind and serve in a daemon thread. After stop(), start() rebinds the same port."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = self._bind()
        server.emulator = self
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"bitrix24-emulator:{self._port}", daemon=True)
        self._thread.start()
        return self

    def _bind(self) -> "_Server":
        """A port outside the kernel's ephemeral range, so that while the portal is stopped no
        outgoing connection of this machine takes it as its local port and start() can rebind
        it; a port still busy (a closing connection) is retried for a while."""
        if self._port:
            end = time.monotonic() + 10
            while True:
                try:
                    return _Server((self.host, self._port), _Handler)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or time.monotonic() > end:
                        raise
                    time.sleep(0.05)
        low = _ephemeral_low()
        for _ in range(100):
            try:
                return _Server((self.host, random.randrange(10000, low)), _Handler)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        return _Server((self.host, 0), _Handler)

    def stop(self) -> None:
        """Stop serving and cut open keep-alive connections (a stopped portal answers nothing)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if thread is not None:
            thread.join(timeout=2)
        self._server = None
        self._thread = None

    def __enter__(self) -> Bitrix24Emulator:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
                self.connections_opened += 1
            else:
                self._conns.discard(conn)

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        if not self._port:
            raise RuntimeError("emulator not started yet (port 0 is chosen at start())")
        return f"http://{self.host}:{self._port}"

    @property
    def webhook_url(self) -> str:
        return f"{self.base_url}/rest/{self.webhook_user_id}/{self.webhook_code}/"

    @property
    def client_endpoint(self) -> str:
        return f"{self.base_url}/rest/"

    @property
    def oauth_url(self) -> str:
        return f"{self.base_url}/oauth/token/"

    @property
    def server_endpoint(self) -> str:
        return f"{self.base_url}/oauth/"

    @property
    def domain(self) -> str:
        """The portal host as events carry it in auth[domain] ("127.0.0.1:PORT")."""
        return urllib.parse.urlsplit(self.base_url).netloc

    # ------------------------------------------------------------------ directory and CRM seeding

    def add_user(self, name: str, last_name: str = "", inner: str | None = None, active: bool = True,
                 online: bool = True, user_id: int | None = None, timeman_status: str = "OPENED",
                 admin: bool | None = None) -> dict:
        """Add (or replace, with the same user_id) an employee; returns his user.get row. ``admin``
        (user.admin) defaults to True only for webhook_user_id, the portal's administrator."""
        with self._lock:
            uid = int(user_id) if user_id is not None else max(self._users, default=0) + 1
            self._users[uid] = {
                "id": uid, "name": name, "last_name": last_name,
                "admin": uid == self.webhook_user_id if admin is None else bool(admin),
                "inner": None if inner in (None, "") else str(inner),
                "active": bool(active), "online": bool(online), "timeman": None,
                "last_activity": _portal_dt(self.clock()), "day_start": None, "day_finish": None,
            }
            self._set_timeman(self._users[uid], timeman_status, check=False)
            return self._user_row(self._users[uid])

    def set_user(self, user_id: int, *, online: bool | None = None, last_activity: datetime | None = None,
                 active: bool | None = None, inner: str | None = None, timeman_status: str | None = None) -> None:
        """Change an employee's presence/workday; None leaves a value as it is (inner "" clears it).
        A naive ``last_activity`` is local time, like the rest of the portal-format user dates."""
        with self._lock:
            u = self._users[int(user_id)]
            if online is not None:
                u["online"] = bool(online)
            if last_activity is not None:
                u["last_activity"] = _portal_dt(last_activity.timestamp())
            if active is not None:
                u["active"] = bool(active)
            if inner is not None:
                u["inner"] = str(inner) or None
            if timeman_status is not None:
                self._set_timeman(u, timeman_status)

    def _set_timeman(self, u: dict, status: str, check: bool = True) -> None:
        """Move the workday and remember when it started/ended (timeman.status TIME_START/FINISH)."""
        if check and status not in _TIMEMAN_STATES:
            raise ValueError(f"timeman_status must be one of {_TIMEMAN_STATES}")
        now, prev = self.clock(), u["timeman"]
        if status in ("OPENED", "PAUSED"):
            if prev not in ("OPENED", "PAUSED"):
                u["day_start"], u["day_finish"] = now, None
        elif status == "EXPIRED":  # opened on an earlier day and never closed
            u["day_start"], u["day_finish"] = now - 86400, None
        elif status == "CLOSED":
            if prev in ("OPENED", "PAUSED", "EXPIRED"):
                u["day_finish"] = now
        else:  # time tracking off for the user
            u["day_start"] = u["day_finish"] = None
        u["timeman"] = status

    def add_contact(self, name: str, phones: list[str], assigned_by_id: int, contact_id: int | None = None,
                    fields: dict | None = None) -> dict:
        """``fields``: extra entity fields (e.g. ``{"UF_CRM_DNC": "1"}``) stored and returned by crm.contact.get."""
        return self._add_crm("CONTACT", name, phones, assigned_by_id, contact_id, fields)

    def add_company(self, title: str, phones: list[str], assigned_by_id: int, company_id: int | None = None,
                    fields: dict | None = None) -> dict:
        return self._add_crm("COMPANY", title, phones, assigned_by_id, company_id, fields)

    def add_lead(self, title: str, phones: list[str], assigned_by_id: int, lead_id: int | None = None,
                 fields: dict | None = None) -> dict:
        return self._add_crm("LEAD", title, phones, assigned_by_id, lead_id, fields)

    def _add_crm(self, etype: str, title: str, phones: list[str], assigned_by_id: int, eid: int | None,
                 fields: dict | None = None) -> dict:
        with self._lock:
            if eid is None:
                eid = max(self._crm_seq[etype], max(self._crm[etype], default=0)) + 1
            eid = int(eid)
            self._crm_seq[etype] = max(self._crm_seq[etype], eid)
            multifield = []
            for phone in phones:
                self._fm_seq += 1
                multifield.append({"ID": str(self._fm_seq), "VALUE_TYPE": "WORK", "VALUE": str(phone),
                                   "TYPE_ID": "PHONE"})
            entity: dict[str, Any] = {"ID": str(eid)}
            if etype == "CONTACT":
                entity.update({"NAME": title, "LAST_NAME": ""})
            else:
                entity["TITLE"] = title
            if etype == "LEAD":
                entity.update({"STATUS_ID": "NEW", "SOURCE_ID": "OTHER"})
            entity.update({"ASSIGNED_BY_ID": str(int(assigned_by_id)), "HAS_PHONE": "Y" if phones else "N",
                           "PHONE": multifield, "DATE_CREATE": _iso(self.clock())})
            entity.update({k: copy.deepcopy(v) for k, v in (fields or {}).items() if k != "ID"})
            self._crm[etype][eid] = entity
            return copy.deepcopy(entity)

    # ------------------------------------------------------------------ workgroups and tasks seeding

    def add_group(self, name: str, member_ids: Iterable[int], owner_id: int | None = None,
                  group_id: int | None = None, moderator_ids: Iterable[int] = ()) -> dict:
        """Add (or replace, with the same group_id) a workgroup; returns its ``groups`` view.
        The owner (default: the first member) gets role A, moderators E, the rest K."""
        members = [int(m) for m in member_ids]
        moderators = [int(m) for m in moderator_ids]
        with self._lock:
            owner = int(owner_id) if owner_id is not None else (members[0] if members else self.webhook_user_id)
            unknown = sorted({owner, *members, *moderators} - set(self._users))
            if unknown:
                raise ValueError(f"unknown users {unknown}: add them first")
            gid = int(group_id) if group_id is not None else max(self._groups, default=0) + 1
            if any(g["NAME"] == name and g["ID"] != gid for g in self._groups.values()):
                raise ValueError(f"a workgroup named {name!r} already exists")  # the portal refuses it too
            roles = {m: "K" for m in members}
            roles.update({m: "E" for m in moderators})
            roles[owner] = "A"
            self._groups[gid] = {"ID": gid, "NAME": name, "OWNER_ID": owner, "ROLES": roles,
                                 "DATE_CREATE": _portal_iso(self.clock())}
            return self._group_view(self._groups[gid])

    def add_task(self, title: str, responsible_id: int, *, group_id: int | None = None,
                 deadline: str | datetime | None = None, status: int = 2, crm: Iterable[str] = (),
                 created_by: int = 1, task_id: int | None = None) -> dict:
        """Add (or replace, with the same task_id) a task; returns its internal record (``tasks`` view).
        ``deadline``: ISO 8601 (no offset = portal time) or a datetime (naive = portal time)."""
        if isinstance(deadline, datetime):
            dl: datetime | None = deadline if deadline.tzinfo else deadline.replace(tzinfo=PORTAL_TZ)
        elif deadline is None:
            dl = None
        else:
            dl = _parse_iso(deadline, naive_ok=True)
            if dl is None:
                raise ValueError(f"deadline must be ISO 8601, got {deadline!r}")
        if int(status) not in range(1, 8):
            raise ValueError("status must be 1..7")
        bindings = _crm_bindings(list(crm))
        if bindings is None:
            raise ValueError(f"crm bindings look like 'C_12', 'CO_3', 'L_7', got {list(crm)!r}")
        with self._lock:
            if group_id and int(group_id) not in self._groups:
                raise ValueError(f"unknown group {group_id}: add_group first")
            if task_id is None:
                task_id = max(self._seq["task"], max(self._tasks, default=0)) + 1
            tid = int(task_id)
            self._seq["task"] = max(self._seq["task"], tid)  # ids of deleted tasks are never reused
            now = _portal_iso(self.clock())
            self._tasks[tid] = {
                "ID": str(tid), "PARENT_ID": "0", "TITLE": title, "DESCRIPTION": "", "PRIORITY": "1",
                "STATUS": str(int(status)), "GROUP_ID": str(int(group_id or 0)),
                "CREATED_BY": str(int(created_by)), "RESPONSIBLE_ID": str(int(responsible_id)),
                "CHANGED_BY": str(int(created_by)), "CREATED_DATE": now, "CHANGED_DATE": now,
                "CLOSED_DATE": now if int(status) == 5 else None,
                "DEADLINE": None if dl is None else dl.astimezone(PORTAL_TZ).isoformat(timespec="seconds"),
                "UF_CRM_TASK": bindings,
            }
            self._comments.setdefault(tid, [])
            return copy.deepcopy(self._tasks[tid])

    def delete_task(self, task_id: int) -> None:
        """Delete a task (as if removed in the UI): it disappears from lists, get answers []."""
        with self._lock:
            del self._tasks[int(task_id)]
            self._comments.pop(int(task_id), None)

    # ------------------------------------------------------------------ inspection (deep copies)

    @property
    def calls(self) -> dict[str, dict]:
        with self._lock:
            out = {}
            for cid, call in self._calls.items():
                c = copy.deepcopy(call)
                c["shown"] = sorted(call["shown"])
                out[cid] = c
            return out

    def call_facts(self, *fields: str) -> list[tuple]:
        """The named fields of every call (no deep copy)."""
        with self._lock:
            return [tuple(call[f] for f in fields) for call in self._calls.values()]

    @property
    def users(self) -> dict[int, dict]:
        with self._lock:
            return {uid: self._user_row(u) for uid, u in self._users.items()}

    @property
    def leads(self) -> dict[int, dict]:
        with self._lock:
            return copy.deepcopy(self._crm["LEAD"])

    @property
    def contacts(self) -> dict[int, dict]:
        with self._lock:
            return copy.deepcopy(self._crm["CONTACT"])

    @property
    def companies(self) -> dict[int, dict]:
        with self._lock:
            return copy.deepcopy(self._crm["COMPANY"])

    @property
    def groups(self) -> dict[int, dict]:
        with self._lock:
            return {gid: self._group_view(g) for gid, g in self._groups.items()}

    @property
    def tasks(self) -> dict[int, dict]:
        with self._lock:
            return copy.deepcopy(self._tasks)

    @property
    def comments(self) -> dict[int, list[dict]]:
        with self._lock:
            return copy.deepcopy(self._comments)

    @property
    def notifications(self) -> list[dict]:
        """Live notifications (one replaced by a later one with the same TAG is gone)."""
        with self._lock:
            return copy.deepcopy(self._notifications)

    @property
    def lines(self) -> dict[str, dict]:
        with self._lock:
            return {n: {k: line[k] for k in ("NUMBER", "NAME", "CRM_AUTO_CREATE")} for n, line in self._lines.items()}

    @property
    def requests(self) -> list[dict]:
        with self._lock:
            return copy.deepcopy(self._requests)

    @property
    def request_count(self) -> int:
        """How many REST requests arrived so far (cheap: no copy of the request log)."""
        with self._lock:
            return len(self._requests)

    def request_facts(self, *params: str) -> list[tuple]:
        """(method, in batch, time, status, *the named params) of every request so far: a cheap
        view of a long request log (no deep copy)."""
        with self._lock:
            return [(r["method"], r["batch"], r["time"], r["status"], *(r["params"].get(p) for p in params))
                    for r in self._requests]

    def requests_for(self, method: str) -> list[dict]:
        name = method.lower()
        with self._lock:
            return [copy.deepcopy(r) for r in self._requests if r["method"] == name]

    # ------------------------------------------------------------------ fault injection

    def set_delay(self, seconds: float, method: str | None = None, count: int | None = None) -> None:
        """Sleep before answering requests of ``method`` (None = any HTTP request); count None = always.

        The request is still processed after the sleep, like a real server whose client gave up.
        """
        key = method.lower() if method else None
        with self._lock:
            self._delays = [d for d in self._delays if d["method"] != key]
            if seconds > 0 and (count is None or count > 0):
                self._delays.append({"seconds": float(seconds), "method": key, "remaining": count})

    def hold(self, method: str, count: int | None = None) -> threading.Event:
        """Keep requests of ``method`` (top level or inside batch) unanswered until the returned
        event is set (or the emulator stops): a portal that is stuck for as long as the test says.
        ``count``: only the next so many requests are held; later ones are answered at once."""
        gate = threading.Event()
        with self._lock:
            self._gates[method.lower()] = gate
            self._gate_counts[method.lower()] = count
        return gate

    def fail_next(self, status: int, error: str, description: str = "", method: str | None = None,
                  count: int = 1, body: str | bytes | None = None, after: bool = False) -> None:
        """Answer the next ``count`` requests of ``method`` (None = any HTTP request, including the
        token endpoint "oauth.token") with this error. A named method also fails inside batch.
        ``body`` replaces the JSON error body with raw text (e.g. a proxy's HTML page).
        ``after``: the portal does the work first and only its answer is lost (a gateway's 502
        after the backend finished), for top-level requests."""
        raw = body.encode("utf-8") if isinstance(body, str) else body
        with self._lock:
            self._faults.append({"status": int(status), "error": error, "description": description,
                                 "method": method.lower() if method else None, "remaining": int(count),
                                 "raw": raw, "after": bool(after)})

    def on_request(self, method: str, hook: Callable[[], None] | None) -> None:
        """Call ``hook()`` when a request of ``method`` (or "oauth.token") arrives, before the
        portal does the work: the world changing while a request is on its way. None removes it."""
        with self._lock:
            if hook is None:
                self._hooks.pop(method.lower(), None)
            else:
                self._hooks[method.lower()] = hook

    def _run_hook(self, method: str) -> None:
        with self._lock:
            hook = self._hooks.get(method)
        if hook is not None:
            hook()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._delays.clear()

    # ------------------------------------------------------------------ OAuth (mode 2)

    def add_application(self, client_id: str, client_secret: str = "other-client-secret") -> None:
        """Another local application on this portal (its tokens work here, but app.info names it)."""
        with self._lock:
            self._apps[client_id] = client_secret

    def issue_tokens(self, user_id: int | None = None, client_id: str | None = None) -> dict:
        """A fresh valid token pair (a new chain), shaped like the token endpoint's answer; by default
        of the application's installing administrator (webhook_user_id)."""
        with self._lock:
            app = client_id or self.client_id
            if app not in self._apps:
                raise ValueError(f"no application {app!r} on this portal (add_application first)")
            return self._issue_pair(self.webhook_user_id if user_id is None else int(user_id), app)

    def expire_access_tokens(self) -> None:
        with self._lock:
            for rec in self._access.values():
                if rec["state"] == "ok":
                    rec["state"] = "expired"

    def revoke_app(self) -> None:
        """The administrator removed the application: its refresh tokens answer invalid_grant, its
        live access tokens invalid_token (one already expired still answers expired_token). Its event
        bindings and offline queue go with it."""
        with self._lock:
            self._bindings.clear()
            self._offline.clear()
            self._placements.clear()
            for rec in self._refresh.values():
                if rec["app"] == self.client_id:
                    rec["state"] = "revoked"
            for rec in self._access.values():
                if rec["state"] != "expired" and rec["app"] == self.client_id:
                    rec["state"] = "dead"
            self._codes.clear()

    def authorization_code(self) -> str:
        with self._lock:
            code = secrets.token_hex(16)
            self._codes[code] = self.clock() + CODE_TTL
            return code

    def _issue_pair(self, user_id: int, app: str | None = None) -> dict:
        now = self.clock()
        app = app or self.client_id
        access, refresh = secrets.token_hex(24), secrets.token_hex(24)
        self._access[access] = {"user_id": user_id, "expires": now + ACCESS_TTL, "state": "ok", "app": app}
        self._refresh[refresh] = {"user_id": user_id, "access": access, "state": "ok",
                                  "expires": now + REFRESH_TTL, "app": app}
        return {
            "access_token": access, "expires": int(now + ACCESS_TTL), "expires_in": ACCESS_TTL,
            "scope": ",".join(self.scopes), "domain": self.domain,
            "server_endpoint": self.server_endpoint, "status": "L", "client_endpoint": self.client_endpoint,
            "member_id": self.member_id, "user_id": user_id, "refresh_token": refresh,
        }

    # ------------------------------------------------------------------ limits

    def set_bucket(self, size: int | None, drain_per_second: float = 2.0) -> None:
        with self._lock:
            self._bucket_size = size
            self._drain = float(drain_per_second)
            self._bucket_level = 0.0
            self._bucket_at = None

    def fill_bucket(self) -> None:
        """The portal's bucket is full now (other applications, or earlier requests, spent it)."""
        with self._lock:
            if self._bucket_size is not None:
                self._bucket_level, self._bucket_at = float(self._bucket_size), self.clock()

    def set_operating_limit(self, method: str, reset_at: float | None) -> None:
        with self._lock:
            if reset_at is None:
                self._operating_limits.pop(method.lower(), None)
            else:
                self._operating_limits[method.lower()] = float(reset_at)

    def _check_bucket(self) -> None:
        with self._lock:
            if self._bucket_size is None:
                return
            now = self.clock()
            if self._bucket_at is not None:
                drained = max(0.0, now - self._bucket_at) * self._drain
                self._bucket_level = max(0.0, self._bucket_level - drained)
            self._bucket_at = now
            if self._bucket_level + 1 > self._bucket_size:
                self.count_503 += 1
                raise ApiError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
            self._bucket_level += 1

    def set_operating_reset(self, method: str, reset_at: float | None) -> None:
        """Good answers of ``method`` announce this ``time.operating_reset_at`` (a method near its
        execution-time limit: the time part of it frees again)."""
        with self._lock:
            if reset_at is None:
                self._operating_resets.pop(method.lower(), None)
            else:
                self._operating_resets[method.lower()] = float(reset_at)

    def _check_operating(self, method: str) -> None:
        with self._lock:
            reset_at = self._operating_limits.get(method)
            if reset_at is None:
                return
            if self.clock() < reset_at:
                raise ApiError(429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.")
            del self._operating_limits[method]

    def _sleep_for(self, method: str, top: bool) -> None:
        with self._lock:
            seconds = 0.0
            for d in self._delays:
                if d["method"] == method or (top and d["method"] is None):
                    seconds = d["seconds"]
                    if d["remaining"] is not None:
                        d["remaining"] -= 1
                        if d["remaining"] <= 0:
                            self._delays.remove(d)
                    break
        if seconds:
            self._stopping.wait(seconds)  # outside the lock; cut short by stop()
        with self._lock:
            gate = self._gates.get(method)
            left = self._gate_counts.get(method)
            if gate is not None and left is not None:
                if left <= 1:  # this request is the last one the gate holds
                    del self._gates[method], self._gate_counts[method]
                else:
                    self._gate_counts[method] = left - 1
        while gate is not None and not gate.is_set() and not self._stopping.is_set():
            gate.wait(0.05)

    def _raise_fault(self, method: str, top: bool, after: bool = False) -> None:
        with self._lock:
            for f in self._faults:
                if f["after"] == after and (f["method"] == method or (top and f["method"] is None)):
                    f["remaining"] -= 1
                    if f["remaining"] <= 0:
                        self._faults.remove(f)
                    raise ApiError(f["status"], f["error"], f["description"], raw=f["raw"])

    # ------------------------------------------------------------------ HTTP entry

    def _dispatch_http(self, verb: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, bytes, str]:
        try:
            status, payload = self._route(verb, raw_path, headers, body)
        except Exception:  # an emulator bug must not look like a hung portal
            with self._lock:
                self.internal_errors.append(traceback.format_exc())
            status, payload = 500, {"error": "INTERNAL_SERVER_ERROR", "error_description": "emulator bug"}
        if isinstance(payload, bytes):
            return status, payload, "text/html; charset=utf-8"
        return status, json.dumps(payload).encode("utf-8"), "application/json; charset=utf-8"

    def _route(self, verb: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        split = urllib.parse.urlsplit(raw_path)
        path = urllib.parse.unquote(split.path)
        params = parse_php_query(split.query)
        files: dict[str, tuple[str, bytes]] = {}
        ctype = (headers.get("Content-Type") or "").lower()
        bad_body = False
        positional = False  # a JSON array body: arguments by position, only some methods take it
        try:
            if "application/json" in ctype:
                if body.strip():
                    data = json.loads(body.decode("utf-8"))
                    if isinstance(data, list):
                        positional = True
                        data = {str(i): v for i, v in enumerate(data)}
                    elif not isinstance(data, dict):
                        raise ValueError("JSON body is not an object")
                    params.update(data)
            elif "multipart/form-data" in ctype:
                fields, files = _parse_multipart(body, headers.get("Content-Type") or "")
                params.update(parse_php_pairs(fields))
            elif body:
                params.update(parse_php_query(body.decode("utf-8")))
        except (ValueError, UnicodeDecodeError):
            bad_body = True

        if path.rstrip("/") == "/oauth/token":
            if bad_body or positional:
                return 400, {"error": "invalid_request", "error_description": "Malformed request body"}
            return self._token_endpoint(params)
        if not path.startswith("/rest/"):
            return 404, {"error": "NOT_FOUND", "error_description": "Not found"}
        parts = [p for p in path[len("/rest/"):].split("/") if p]
        webhook: tuple[str, str] | None = None
        if len(parts) == 3:
            webhook = (parts[0], parts[1])
        elif len(parts) != 1:
            return 404, {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}
        method = parts[-1].lower()
        if method.endswith(".json"):
            method = method[:-5]
        if bad_body or (positional and method not in _POSITIONAL_BODY):
            entry = self._record(method, {}, "webhook" if webhook else None)
            err = ApiError(400, "INVALID_REQUEST", "Request body could not be parsed")
            self._close(entry, err.status, err.error)
            return err.status, err.body()
        return self._rest_call(method, params, files, webhook)

    def _rest_call(self, method: str, params: dict, files: dict, webhook: tuple[str, str] | None) -> tuple[int, Any]:
        start, t0 = self.clock(), time.perf_counter()
        token = params.pop("auth", None)  # never kept in params or in the request log
        auth_kind = "webhook" if webhook else ("oauth" if token else None)
        entry = self._record(method, params, auth_kind)
        try:
            self._run_hook(method)
            self._check_bucket()
            self._sleep_for(method, top=True)
            self._raise_fault(method, top=True)
            if method == "upload" and webhook is None:
                result: Any = self._upload(params, files)
            else:
                ctx = self._authenticate(webhook, token)
                result = self._invoke(method, params, ctx, sub_call=False)
            self._raise_fault(method, top=True, after=True)
        except ApiError as err:
            self._close(entry, err.status, err.error)
            return err.status, (err.raw if err.raw is not None else err.body())
        self._close(entry, 200, None)
        return 200, self._envelope(result, start, t0, method)

    def _envelope(self, result: Any, start: float, t0: float, method: str) -> dict:
        if isinstance(result, _Page):
            out: dict[str, Any] = {"result": result.rows, "total": result.total}
            if result.next is not None:
                out["next"] = result.next
        else:
            out = {"result": result}
        out["time"] = self._time_block(start, t0, method)
        return out

    def _time_block(self, start: float, t0: float, method: str) -> dict:
        duration = time.perf_counter() - t0
        finish = start + duration
        with self._lock:
            pending = [r for r in self._operating_limits.values() if r > start]
            reset_at = int(max(pending)) if pending else int(start) + 600
            if method in self._operating_resets:
                reset_at = int(self._operating_resets[method])
            operating = round(self._operating_used.get(method, 0.0), 6)
        return {"start": start, "finish": finish, "duration": duration, "processing": duration,
                "date_start": _iso(start), "date_finish": _iso(finish),
                "operating": operating, "operating_reset_at": reset_at}

    def _record(self, method: str, params: dict, auth: str | None, batch: bool = False) -> dict:
        entry = {"method": method, "params": copy.deepcopy(params), "auth": auth, "status": None,
                 "error": None, "time": self.clock(), "batch": batch}
        with self._lock:
            self._requests.append(entry)
        return entry

    def _close(self, entry: dict, status: int, error: str | None) -> None:
        with self._lock:
            entry["status"] = status
            entry["error"] = error

    def _authenticate(self, webhook: tuple[str, str] | None, token: Any) -> _Ctx:
        with self._lock:
            if webhook is not None:
                if webhook[0] != str(self.webhook_user_id) or webhook[1] != self.webhook_code:
                    raise ApiError(401, "NO_AUTH_FOUND", "Wrong authorization data")
                return _Ctx(self.webhook_user_id, "webhook")
            if not token or not isinstance(token, str):
                raise ApiError(401, "NO_AUTH_FOUND", "Wrong authorization data")
            rec = self._access.get(token)
            if rec is None or rec["state"] == "dead":
                raise ApiError(401, "invalid_token", "Unable to get application by token")
            if rec["state"] == "expired" or self.clock() >= rec["expires"]:
                raise ApiError(401, "expired_token", "The access token provided has expired.")
            return _Ctx(rec["user_id"], "oauth", app=rec.get("app", self.client_id))

    def _invoke(self, method: str, params: dict, ctx: _Ctx, sub_call: bool) -> Any:
        if sub_call:  # top-level faults/delays were applied before auth
            self._sleep_for(method, top=False)
            self._raise_fault(method, top=False)
        spec = _METHODS.get(method)
        if spec is None:
            raise ApiError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        scopes, attr = spec
        if scopes is not None and not set(scopes) & set(self.scopes):
            kind = "webhook token" if ctx.auth == "webhook" else "access token"
            raise ApiError(403, "insufficient_scope", f"The request requires higher privileges than provided by the {kind}")
        if ctx.auth == "webhook" and (method in _EVENT_METHODS or method in PLACEMENT_METHODS or
                                      (method in _APP_ONLY and not self.allow_webhook_telephony)):
            raise ApiError(403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method")
        self._check_operating(method)
        t0 = time.perf_counter()
        if method == "batch":
            result = self._batch(params, ctx)
        elif method in _SELF_LOCKING:
            result = getattr(self, attr)(params, ctx)
        else:
            with self._lock:
                result = getattr(self, attr)(params, ctx)
        with self._lock:
            self._operating_used[method] = self._operating_used.get(method, 0.0) + time.perf_counter() - t0
        return result

    # ------------------------------------------------------------------ batch

    def _batch(self, params: dict, ctx: _Ctx) -> dict:
        cmd = params.get("cmd")
        halt = _php_int(params.get("halt", 0)) != 0
        listy = isinstance(cmd, list)
        if listy:
            items: list[tuple[Any, Any]] = list(enumerate(cmd))
        elif isinstance(cmd, dict):
            items = list(cmd.items())
        else:
            items = []
        if len(items) > BATCH_MAX:
            raise ApiError(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
        parsed: list[tuple[Any, str, str]] = []
        for key, command in items:
            text = command if isinstance(command, str) else ""
            name, _, query = text.partition("?")
            name = name.strip().strip("/").lower()
            if name.endswith(".json"):
                name = name[:-5]
            if name == "batch":
                raise ApiError(405, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Batch method is not allowed")
            parsed.append((key, name, query))

        results: dict[Any, Any] = {}
        errors: dict[Any, Any] = {}
        totals: dict[Any, Any] = {}
        nexts: dict[Any, Any] = {}
        times: dict[Any, Any] = {}
        sub_ctx = _Ctx(ctx.user_id, ctx.auth, in_batch=True, app=ctx.app)
        for key, name, query in parsed:
            # References are replaced in the raw query, before it is parsed (values URL-encoded).
            sub = parse_php_query(self._substitute(query, results))
            sub.pop("auth", None)
            start, t0 = self.clock(), time.perf_counter()
            entry = self._record(name, sub, ctx.auth, batch=True)
            try:
                res = self._invoke(name, sub, sub_ctx, sub_call=True)
            except ApiError as err:
                self._close(entry, err.status, err.error)
                errors[key] = err.body()
                if halt:
                    break
                continue
            self._close(entry, 200, None)
            if isinstance(res, _Page):
                results[key] = res.rows
                totals[key] = res.total
                if res.next is not None:
                    nexts[key] = res.next
            else:
                results[key] = res
            times[key] = self._time_block(start, t0, name)
        return {"result": _batch_map(results, listy), "result_error": _batch_map(errors, listy),
                "result_total": _batch_map(totals, listy), "result_next": _batch_map(nexts, listy),
                "result_time": _batch_map(times, listy)}

    @staticmethod
    def _substitute(query: str, results: dict) -> str:
        def repl(m: re.Match) -> str:
            found, value = _lookup(results, m.group(1))
            for seg in _BRACKETS.findall(m.group(2)):
                if not found:
                    break
                found, value = _lookup(value, seg)
            if not found:
                return m.group(0)  # unresolved references stay literal, as text
            return urllib.parse.quote(_php_str(value), safe="")
        return _RESULT_REF.sub(repl, query)

    def _m_batch_placeholder(self, params: dict, ctx: _Ctx) -> Any:  # pragma: no cover
        raise AssertionError("batch is dispatched by _invoke")

    # ------------------------------------------------------------------ token endpoint

    def _token_endpoint(self, params: dict) -> tuple[int, Any]:
        shown = dict(params)
        if "client_secret" in shown:
            shown["client_secret"] = "***"
        entry = self._record("oauth.token", shown, None)
        try:
            self._run_hook("oauth.token")
            self._sleep_for("oauth.token", top=True)
            self._raise_fault("oauth.token", top=True)
            with self._lock:
                result = self._grant(params)
        except ApiError as err:
            self._close(entry, err.status, err.error)
            return err.status, (err.raw if err.raw is not None else err.body())
        self._close(entry, 200, None)
        return 200, result

    def _grant(self, params: dict) -> dict:
        client_id = params.get("client_id")
        if not isinstance(client_id, str) or self._apps.get(client_id) != params.get("client_secret"):
            raise ApiError(400, "invalid_client", "Invalid client credentials")
        grant = params.get("grant_type")
        now = self.clock()
        if grant == "refresh_token":
            token = params.get("refresh_token")
            if not token or not isinstance(token, str):
                raise ApiError(400, "invalid_request", "refresh_token is required")
            rec = self._refresh.get(token)
            if rec is not None and rec["state"] == "used":
                self.spent_refresh_uses += 1
                raise ApiError(400, "invalid_grant", "The refresh token was already used")
            if rec is None or rec["state"] != "ok" or now >= rec["expires"] or rec["app"] != client_id:
                # A refresh token only ever works for the application it was issued to.
                raise ApiError(400, "invalid_grant", "Invalid refresh token")
            # Single-use rotation: the used refresh token and its access token both die.
            rec["state"] = "used"
            access = self._access.get(rec["access"])
            if access is not None:
                access["state"] = "dead"
            self.refresh_count += 1
            return self._issue_pair(rec["user_id"], rec["app"])
        if grant == "authorization_code":
            code = params.get("code")
            expires = self._codes.pop(code, None) if isinstance(code, str) else None
            if expires is None or now > expires or client_id != self.client_id:
                raise ApiError(400, "invalid_grant", "Invalid or expired authorization code")
            return self._issue_pair(self.webhook_user_id)
        raise ApiError(400, "invalid_request", "Unsupported grant_type")

    # ------------------------------------------------------------------ basics

    def _m_scope(self, p: dict, ctx: _Ctx) -> list[str]:
        return list(self.scopes)

    def _m_profile(self, p: dict, ctx: _Ctx) -> dict:
        u = self._users.get(ctx.user_id)
        return {"ID": str(ctx.user_id), "ADMIN": self._m_user_admin(p, ctx),
                "NAME": u["name"] if u else "Portal", "LAST_NAME": u["last_name"] if u else "Admin",
                "PERSONAL_GENDER": "", "TIME_ZONE": ""}

    def _m_app_info(self, p: dict, ctx: _Ctx) -> dict:
        """The application the token belongs to (Bitrix24 REST docs: app.info); a webhook has none."""
        if ctx.app is None:
            raise ApiError(400, "ACCESS_DENIED", "Access denied! Application context required")
        return {"ID": list(self._apps).index(ctx.app) + 1, "CODE": ctx.app, "VERSION": 1, "STATUS": "L",
                "INSTALLED": True, "PAYMENT_EXPIRED": "N", "DAYS": None, "LANGUAGE_ID": "en",
                "LICENSE": "en_project", "LICENSE_TYPE": "project", "LICENSE_FAMILY": "project"}

    def _m_user_admin(self, p: dict, ctx: _Ctx) -> bool:
        """Whether the token's user may manage applications (Bitrix24 REST docs: user.admin)."""
        user = self._users.get(ctx.user_id)
        return bool(user["admin"]) if user is not None else ctx.user_id == self.webhook_user_id

    def _m_methods(self, p: dict, ctx: _Ctx) -> list[str]:
        mine = set(self.scopes)
        return sorted(m for m, (sc, _) in _METHODS.items() if sc is None or set(sc) & mine)

    # ------------------------------------------------------------------ users

    def _user_row(self, u: dict) -> dict:
        return {"ID": str(u["id"]), "ACTIVE": u["active"], "NAME": u["name"], "LAST_NAME": u["last_name"],
                "EMAIL": "", "WORK_PHONE": "", "PERSONAL_PHONE": "", "PERSONAL_MOBILE": "",
                "UF_PHONE_INNER": u["inner"], "UF_DEPARTMENT": [1], "IS_ONLINE": "Y" if u["online"] else "N",
                "LAST_ACTIVITY_DATE": u["last_activity"], "USER_TYPE": "employee", "TIME_ZONE": ""}

    def _m_user_get(self, p: dict, ctx: _Ctx) -> _Page:
        flt: dict[str, Any] = {}
        reserved = {"FILTER", "SORT", "ORDER", "SELECT", "ADMIN_MODE", "IMAGE_RESIZE", "START"}
        for key, value in p.items():
            if key.upper() == "FILTER" and isinstance(value, dict):
                flt.update(value)
            elif key.upper() not in reserved:
                flt[key] = value  # the docs allow filter keys at top level
        rows = [self._user_row(self._users[uid]) for uid in sorted(self._users)]
        rows = [r for r in rows if all(_filter_match(r, k, v) for k, v in flt.items())]
        return _paginate(rows, p.get("start", p.get("START")))

    def _resolve_user(self, p: dict) -> int:
        uid = _php_int(p.get("USER_ID"))
        if uid > 0:
            u = self._users.get(uid)
            if u is None or not u["active"]:
                raise _core("User is not found or is not active")
            return uid
        inner = p.get("USER_PHONE_INNER")
        if inner is None or isinstance(inner, (dict, list)) or str(inner) == "":
            raise _core("USER_ID or USER_PHONE_INNER should be set")
        for candidate in sorted(self._users):
            u = self._users[candidate]
            if u["active"] and u["inner"] == str(inner):
                return candidate
        raise _core("User is not found or is not active")

    # ------------------------------------------------------------------ CRM helpers

    def _crm_matches(self, phone: Any) -> list[tuple[str, dict]]:
        key = normalize_digits(phone)
        if not key:
            return []
        found = []
        for etype in _CRM_TYPES:
            for eid in sorted(self._crm[etype]):
                ent = self._crm[etype][eid]
                if any(normalize_digits(fm["VALUE"]) == key for fm in ent["PHONE"]):
                    found.append((etype, ent))
        return found

    def _is_inner_number(self, phone: str) -> bool:
        return any(u["inner"] is not None and u["inner"] == phone for u in self._users.values())

    @staticmethod
    def _display_name(etype: str, ent: dict) -> str:
        if etype == "CONTACT":
            return f"{ent['NAME']} {ent['LAST_NAME']}".strip()
        return ent["TITLE"]

    # ------------------------------------------------------------------ telephony

    def _m_register(self, p: dict, ctx: _Ctx, dedup: bool = True) -> dict:
        uid = self._resolve_user(p)
        phone = sanitize_phone(p.get("PHONE_NUMBER"))
        if not phone:
            raise _core("Unsupported phone number format")
        call_type = _php_int(p.get("TYPE"))
        if call_type not in (1, 2, 3, 4, 5):
            raise _core("Unknown TYPE")
        start_date = p.get("CALL_START_DATE")
        if start_date not in (None, "") and not _valid_atom(start_date):
            raise _core("CALL_START_DATE should be in the ISO-8601 format")
        line = _opt_str(p.get("LINE_NUMBER"))
        external_id = _opt_str(p.get("EXTERNAL_CALL_ID"))
        show = _php_int(p.get("SHOW", 1)) != 0
        now = self.clock()
        if line and line not in self._lines:  # server code: an unknown LINE_NUMBER creates the line
            self._new_line(line, "", "Y")

        # Dedup on user+phone+type+line+external id within 30 min, even for finished calls.
        key = (uid, phone, call_type, line, external_id)
        prior = self._dedup.get(key) if dedup else None
        if prior is not None and now - prior[1] < DEDUP_WINDOW and prior[0] in self._calls:
            call = self._calls[prior[0]]
            call["register_count"] += 1
            if show and not call["finished"]:
                self._show_card(call, [uid])
            return {"CALL_ID": call["CALL_ID"], "CRM_CREATED_LEAD": None, "CRM_CREATED_ENTITIES": [],
                    "CRM_ENTITY_TYPE": call["crm_entity_type"], "CRM_ENTITY_ID": call["crm_entity_id"]}

        etype = _opt_str(p.get("CRM_ENTITY_TYPE")).upper()
        eid = _php_int(p.get("CRM_ENTITY_ID"))
        bound_type: str | None = None
        bound_id: int | None = None
        if etype in _CRM_TYPES and eid > 0:
            bound_type, bound_id = etype, eid
        else:
            matches = self._crm_matches(phone)
            if matches:
                bound_type, bound_id = matches[0][0], int(matches[0][1]["ID"])
        created_lead: int | None = None
        created: list[dict] = []
        if bound_type is None and _php_int(p.get("CRM_CREATE", 0)) != 0 and not self._is_inner_number(phone):
            title = ("Outgoing call " if call_type == 1 else "Incoming call ") + phone
            lead = self._add_crm("LEAD", title, [phone], uid, None)
            self._crm["LEAD"][int(lead["ID"])]["SOURCE_ID"] = "CALL"
            created_lead = int(lead["ID"])
            created = [{"ENTITY_TYPE": "LEAD", "ENTITY_ID": created_lead}]
            bound_type, bound_id = "LEAD", created_lead

        self._seq["call"] += 1
        digest = hashlib.md5(f"{uid}|{phone}|{now}|{self._seq['call']}|{secrets.token_hex(4)}".encode()).hexdigest()
        call_id = f"externalCall.{digest}.{int(now)}"
        call = {
            "CALL_ID": call_id, "register": copy.deepcopy(p), "user_id": uid, "type": call_type,
            "phone": phone, "line": line, "external_call_id": external_id, "registered_at": now,
            "start_date": start_date if start_date not in (None, "") else _iso(now),
            "crm_entity_type": bound_type, "crm_entity_id": bound_id, "crm_created_lead": created_lead,
            "shown": set(), "card_events": [], "finished": False, "finish": None, "status_code": None,
            "duration": None, "finish_user_id": None, "record": None, "register_count": 1,
            "auth": ctx.auth, "crm_activity_id": None, "finished_at": None,
        }
        self._calls[call_id] = call
        if dedup:
            self._dedup[key] = (call_id, now)
        if show:
            self._show_card(call, [uid])
        return {"CALL_ID": call_id, "CRM_CREATED_LEAD": created_lead, "CRM_CREATED_ENTITIES": created,
                "CRM_ENTITY_TYPE": bound_type, "CRM_ENTITY_ID": bound_id}

    @staticmethod
    def _show_card(call: dict, users: list[int]) -> None:
        for uid in users:
            call["shown"].add(uid)
            call["card_events"].append(("show", uid))

    @staticmethod
    def _hide_card(call: dict, users: list[int]) -> None:
        for uid in users:
            call["shown"].discard(uid)
            call["card_events"].append(("hide", uid))

    def _live_call(self, p: dict) -> dict | None:
        call_id = p.get("CALL_ID")
        call = self._calls.get(call_id) if isinstance(call_id, str) else None
        # finish deletes the live call record, so show/hide on a finished call answer false.
        return None if call is None or call["finished"] else call

    def _m_show(self, p: dict, ctx: _Ctx) -> bool:
        call = self._live_call(p)
        if call is None:
            return False
        self._show_card(call, _int_list(p.get("USER_ID")) or [call["user_id"]])
        return True

    def _m_hide(self, p: dict, ctx: _Ctx) -> bool:
        call = self._live_call(p)
        if call is None:
            return False
        self._hide_card(call, _int_list(p.get("USER_ID")) or [call["user_id"]])
        return True

    def _m_finish(self, p: dict, ctx: _Ctx) -> dict:
        call_id = p.get("CALL_ID")
        if not isinstance(call_id, str):
            raise ApiError(400, "INVALID_ARGUMENT", "CALL_ID must be a string")
        call = self._calls.get(call_id)
        if call is None or call["finished"]:
            raise _core(NOT_REGISTERED_TEXT)
        uid = self._resolve_user(p)
        duration = _php_int(p.get("DURATION", 0))
        status_code = _opt_str(p.get("STATUS_CODE")) or ("200" if duration > 0 else "304")
        try:
            cost = float(p.get("COST") or 0)
        except (TypeError, ValueError):
            cost = 0.0
        vote = _php_int(p.get("VOTE")) or None
        activity_id: int | None = None
        if call["crm_entity_type"] is not None:
            self._seq["activity"] += 1
            activity_id = self._seq["activity"]
        if call["crm_created_lead"] is not None:
            lead = self._crm["LEAD"].get(call["crm_created_lead"])
            if lead is not None:  # the finishing user becomes responsible for auto-created items
                lead["ASSIGNED_BY_ID"] = str(uid)
        self._seq["stat"] += 1
        call.update({"finished": True, "finish": copy.deepcopy(p), "status_code": status_code,
                     "duration": duration, "finish_user_id": uid, "crm_activity_id": activity_id,
                     "finished_at": self.clock()})
        # finish hides the card of its USER_ID only (Bitrix24 REST docs: telephony.externalcall.hide);
        # everybody else who sees it, the registered user included, keeps it until a hide.
        self._hide_card(call, sorted({uid} & call["shown"]))
        return {
            "ID": self._seq["stat"], "CALL_ID": call_id, "EXTERNAL_CALL_ID": call["external_call_id"] or None,
            "PORTAL_USER_ID": uid, "PHONE_NUMBER": call["phone"], "PORTAL_NUMBER": call["line"],
            "INCOMING": str(call["type"]), "CALL_DURATION": duration, "CALL_START_DATE": {},
            "CALL_STATUS": 1 if duration > 0 else 0, "CALL_VOTE": vote, "COST": cost,
            "COST_CURRENCY": _opt_str(p.get("COST_CURRENCY")), "CALL_FAILED_CODE": status_code,
            "CALL_FAILED_REASON": _opt_str(p.get("FAILED_REASON")),
            "REST_APP_ID": "1" if ctx.auth == "oauth" else "", "REST_APP_NAME": "Emulator app" if ctx.auth == "oauth" else "",
            "CRM_ACTIVITY_ID": activity_id, "COMMENT": None,
            "CRM_ENTITY_TYPE": call["crm_entity_type"], "CRM_ENTITY_ID": call["crm_entity_id"],
        }

    def _m_attach_record(self, p: dict, ctx: _Ctx) -> dict:
        # Self-locking: a RECORD_URL download must not hold the lock (it may point back at us).
        call_id = p.get("CALL_ID")
        with self._lock:
            call = self._calls.get(call_id) if isinstance(call_id, str) else None
            if call is None or not call["finished"]:
                raise _core(NOT_FINISHED_TEXT)
        record_url = _opt_str(p.get("RECORD_URL"))
        filename = _opt_str(p.get("FILENAME"))
        if not record_url and ctx.in_batch:
            raise ApiError(405, "ERROR_BATCH_METHOD_NOT_ALLOWED", "File upload is not allowed in batch")
        if not record_url and not filename:
            raise _core("File name is empty")
        if record_url and not filename:
            filename = os.path.basename(urllib.parse.urlsplit(record_url).path)
        if os.path.splitext(filename)[1].lower() not in (".wav", ".mp3"):
            raise _core("Wrong file extension. Only wav and mp3 are allowed")

        if record_url:
            content = _fetch_loopback(record_url)
            return self._store_record(call_id, filename, content, "url")
        if "FILE_CONTENT" in p:
            raw = p.get("FILE_CONTENT")
            if raw in (None, ""):
                raise _core("File content is empty.")
            try:
                # Strict: no whitespace, no data: prefix; a '+' turned into ' ' by bad form encoding fails.
                content = base64.b64decode(str(raw), validate=True)
            except (binascii.Error, ValueError):
                raise _core("File content is not properly encoded. Base64 encoding is expected.") from None
            return self._store_record(call_id, filename, content, "base64")
        token = secrets.token_hex(16)
        with self._lock:
            self._uploads[token] = {"call_id": call_id, "filename": filename}
        return {"uploadUrl": f"{self.base_url}/rest/upload.json?token={token}", "fieldName": "file"}

    def _store_record(self, call_id: str, filename: str, content: bytes, via: str) -> dict:
        with self._lock:
            call = self._calls[call_id]
            self._seq["file"] += 1
            call["record"] = {"filename": filename, "content": content, "via": via, "file_id": self._seq["file"]}
            return {"FILE_ID": self._seq["file"]}

    def _upload(self, params: dict, files: dict[str, tuple[str, bytes]]) -> dict:
        token = params.get("token")
        with self._lock:
            pending = self._uploads.get(token) if isinstance(token, str) else None
            if pending is None:
                raise ApiError(400, "ERROR_CORE", "Upload token is not valid or was already used")
            if "file" not in files:
                raise ApiError(400, "ERROR_CORE", "File is not uploaded")
            del self._uploads[token]  # one-time
            return self._store_record(pending["call_id"], pending["filename"], files["file"][1], "upload")

    def _m_search_crm(self, p: dict, ctx: _Ctx) -> list[dict]:
        phone = p.get("PHONE_NUMBER")
        if phone in (None, "") or isinstance(phone, (dict, list)):
            raise _core("PHONE_NUMBER is empty")
        out = []
        for etype, ent in self._crm_matches(phone):
            aid = _php_int(ent["ASSIGNED_BY_ID"])
            u = self._users.get(aid)
            out.append({
                "CRM_ENTITY_TYPE": etype, "CRM_ENTITY_ID": int(ent["ID"]), "ASSIGNED_BY_ID": aid,
                "NAME": self._display_name(etype, ent),
                "ASSIGNED_BY": {"ID": str(aid), "TIMEMAN_STATUS": u["timeman"] if u else "UNAVAILABLE",
                                "USER_PHONE_INNER": u["inner"] if u else None, "WORK_PHONE": "",
                                "PERSONAL_PHONE": "", "PERSONAL_MOBILE": ""},
            })
        return out

    # ------------------------------------------------------------------ CRM methods

    def _m_findbycomm(self, p: dict, ctx: _Ctx) -> Any:
        # CRM upper-cases parameter names, so `type` and `TYPE` both work. Errors put the text in "error".
        up = {str(k).upper(): v for k, v in p.items()}
        comm_type = _opt_str(up.get("TYPE")).upper()
        if not comm_type:
            raise ApiError(400, "Communication type is not defined.", "")
        if comm_type not in ("PHONE", "EMAIL"):
            raise ApiError(400, f"Communication type '{comm_type}' is not supported in current context.", "")
        values = up.get("VALUES")
        if isinstance(values, dict):
            values = list(values.values())
        elif isinstance(values, (str, int)):
            values = [values]
        if not values:
            raise ApiError(400, "Communication values is not defined.", "")
        if len(values) > FINDBYCOMM_MAX:
            raise ApiError(400, f"Too many communication values (maximum is {FINDBYCOMM_MAX}).", "")
        entity_type = _opt_str(up.get("ENTITY_TYPE")).upper()
        if entity_type and entity_type not in _CRM_TYPES:
            raise ApiError(400, f"Entity type '{entity_type}' is not supported in current context.", "")
        found: dict[str, list[int]] = {}
        if comm_type == "PHONE":
            keys = {normalize_digits(v) for v in values} - {""}
            for etype in _CRM_TYPES:
                if entity_type and etype != entity_type:
                    continue
                ids = [eid for eid in sorted(self._crm[etype])
                       if any(normalize_digits(fm["VALUE"]) in keys for fm in self._crm[etype][eid]["PHONE"])]
                if ids:
                    found[etype] = ids[:FINDBYCOMM_MAX]
                if len(ids) >= FINDBYCOMM_MAX:
                    break  # documented quirk: later types are not returned
        return found or []  # PHP's empty array

    def _crm_get(self, etype: str, p: dict) -> dict:
        up = {str(k).upper(): v for k, v in p.items()}
        eid = _php_int(up.get("ID"))
        if eid <= 0:
            raise ApiError(400, "", "ID is not defined or invalid.")
        ent = self._crm[etype].get(eid)
        if ent is None:
            raise ApiError(400, "", "Not found")
        return copy.deepcopy(ent)

    def _m_lead_get(self, p: dict, ctx: _Ctx) -> dict:
        return self._crm_get("LEAD", p)

    def _m_contact_get(self, p: dict, ctx: _Ctx) -> dict:
        return self._crm_get("CONTACT", p)

    def _m_company_get(self, p: dict, ctx: _Ctx) -> dict:
        return self._crm_get("COMPANY", p)

    # ------------------------------------------------------------------ external lines

    def _new_line(self, number: str, name: str, auto: str) -> dict:
        self._seq["line"] += 1
        line = {"ID": self._seq["line"], "NUMBER": number, "NAME": name, "CRM_AUTO_CREATE": auto}
        self._lines[number] = line
        return line

    @staticmethod
    def _line_number(p: dict) -> str:
        number = p.get("NUMBER")
        if number is None or isinstance(number, (dict, list)) or _php_str(number).strip() == "":
            raise _core("NUMBER should not be empty")
        return _php_str(number)

    @staticmethod
    def _auto_create(value: Any) -> str:
        text = _opt_str(value)
        if text not in ("Y", "N"):  # strict: the docs only name "Y" and "N"
            raise _core("CRM_AUTO_CREATE should be Y or N")
        return text

    def _m_line_add(self, p: dict, ctx: _Ctx) -> dict:
        number = self._line_number(p)
        if len(number) > LINE_NUMBER_MAX:
            raise _core("DB error")  # the column holds 50 characters
        auto = self._auto_create(p["CRM_AUTO_CREATE"]) if "CRM_AUTO_CREATE" in p else "Y"
        if number in self._lines:
            raise _core("Line already exists")
        return {"ID": self._new_line(number, _opt_str(p.get("NAME")), auto)["ID"]}

    def _m_line_get(self, p: dict, ctx: _Ctx) -> list[dict]:
        lines = sorted(self._lines.values(), key=lambda line: line["ID"])
        return [{k: line[k] for k in ("NUMBER", "NAME", "CRM_AUTO_CREATE")} for line in lines]

    def _m_line_update(self, p: dict, ctx: _Ctx) -> dict:
        number = self._line_number(p)
        if "NAME" not in p and "CRM_AUTO_CREATE" not in p:
            raise _core("There are no fields to update")
        line = self._lines.get(number)
        if line is None:
            raise _core(f"Could not find line with number {number}")
        auto = self._auto_create(p["CRM_AUTO_CREATE"]) if "CRM_AUTO_CREATE" in p else line["CRM_AUTO_CREATE"]
        if "NAME" in p:
            line["NAME"] = _opt_str(p["NAME"])
        line["CRM_AUTO_CREATE"] = auto
        return {"ID": str(line["ID"])}  # sic: a string here, an int from add

    def _m_line_delete(self, p: dict, ctx: _Ctx) -> list:
        number = self._line_number(p)
        if number not in self._lines:  # strict: deleting nothing is reported, not ignored
            raise _core(f"Could not find line with number {number}")
        del self._lines[number]
        return []

    # ------------------------------------------------------------------ workgroups

    @staticmethod
    def _group_row(g: dict) -> dict:
        return {"ID": str(g["ID"]), "SITE_ID": "s1", "NAME": g["NAME"], "DESCRIPTION": "",
                "DATE_CREATE": g["DATE_CREATE"], "DATE_UPDATE": g["DATE_CREATE"], "DATE_ACTIVITY": g["DATE_CREATE"],
                "ACTIVE": "Y", "VISIBLE": "Y", "OPENED": "N", "CLOSED": "N", "SUBJECT_ID": "1",
                "OWNER_ID": str(g["OWNER_ID"]), "NUMBER_OF_MEMBERS": str(len(g["ROLES"])), "PROJECT": "N",
                "IS_EXTRANET": "N"}

    def _group_view(self, g: dict) -> dict:
        view = self._group_row(g)
        view["MEMBERS"] = dict(sorted(g["ROLES"].items()))  # user id -> role A/E/K
        return view

    def _m_group_get(self, p: dict, ctx: _Ctx) -> _Page:
        up = {str(k).upper(): v for k, v in p.items()}  # old-style method: parameter names in any case
        flt = up.get("FILTER") if isinstance(up.get("FILTER"), dict) else {}
        rows = [self._group_row(g) for g in self._groups.values()]
        for key, wanted in flt.items():
            m = _FILTER_KEY.match(str(key))
            if m and m.group(2).upper() == "GROUP_ID":  # documented shortcut for ID
                key = (m.group(1) or "") + "ID"
            rows = [r for r in rows if _filter_match(r, key, wanted)]
        order = up.get("ORDER") if isinstance(up.get("ORDER"), dict) and up.get("ORDER") else {"ID": "DESC"}
        rows.sort(key=lambda r: int(r["ID"]))
        for field, direction in reversed(list(order.items())):
            field = str(field).upper()
            if field not in ("ID", "NAME", "OWNER_ID", "NUMBER_OF_MEMBERS", "DATE_CREATE"):
                continue  # unknown sort fields are ignored by this old-style method
            numeric = field in ("ID", "OWNER_ID", "NUMBER_OF_MEMBERS")
            rows.sort(key=lambda r: int(r[field]) if numeric else r[field].lower(),
                      reverse=_php_str(direction).upper() == "DESC")
        return _paginate(rows, up.get("START"))

    def _m_group_user_get(self, p: dict, ctx: _Ctx) -> list[dict]:
        up = {str(k).upper(): v for k, v in p.items()}
        gid = _php_int(up.get("ID"))
        if gid <= 0:
            raise ApiError(400, "", "Wrong socialnetwork group ID")
        group = self._groups.get(gid)
        if group is None:
            raise ApiError(400, "", "Socialnetwork group not found")
        rank = {"A": 0, "E": 1, "K": 2}
        members = sorted(group["ROLES"].items(), key=lambda item: (rank[item[1]], item[0]))
        return [{"USER_ID": str(uid), "ROLE": role} for uid, role in members
                if uid in self._users and self._users[uid]["active"]]

    # ------------------------------------------------------------------ tasks

    @staticmethod
    def _task_params(method: str, p: dict) -> None:
        # A misspelt or UPPER_CASE parameter would silently not bind on the portal (e.g. FILTER ->
        # every task); refuse it so the client bug shows.
        allowed = _TASK_PARAMS[method]
        unknown = sorted(str(k) for k in p if k not in allowed)
        if unknown:
            raise ApiError(400, "100", f"Unknown parameter {{{unknown[0]}}}; expected {', '.join(sorted(allowed))}")

    @staticmethod
    def _task_id(p: dict) -> int:
        if "taskId" not in p:
            raise ApiError(400, "100", "Could not find value for parameter {taskId}")
        raw = p["taskId"]
        if isinstance(raw, (bool, dict, list)) or not re.fullmatch(r"\s*\d+\s*", _php_str(raw)) or int(raw) <= 0:
            raise ApiError(400, "0", "Wrong task ID")
        return int(raw)

    @staticmethod
    def _task_select(value: Any) -> list[str]:
        if value in (None, "", [], {}):
            return list(_TASK_FIELDS)
        items = _php_list(value)
        out: list[str] = []
        for item in ([value] if items is None else items):
            name = _php_str(item)
            for field in (_TASK_FIELDS if name == "*" else (name,)):  # "*" still leaves UF_* out
                if field not in _TASK_FIELDS and field not in _TASK_UF:
                    raise ApiError(400, "100", f"Invalid select field {name} (select takes UPPER_CASE names)")
                if field not in out:
                    out.append(field)
        return out

    def _sub_status(self, rec: dict) -> str:
        """subStatus: -1 for an open task past its deadline, else the real status."""
        if rec["STATUS"] in ("1", "2", "3") and rec["DEADLINE"] and \
                datetime.fromisoformat(rec["DEADLINE"]).timestamp() < self.clock():
            return "-1"
        return rec["STATUS"]

    def _task_out(self, rec: dict, fields: list[str]) -> dict:
        out: dict[str, Any] = {"id": rec["ID"]}
        for field in fields:
            if field == "ID":
                continue
            if field == "SUB_STATUS":
                value: Any = self._sub_status(rec)
            elif field == "UF_CRM_TASK":
                value = list(rec["UF_CRM_TASK"]) or False  # PHP answers false for an empty binding
            else:
                value = rec[field]
            out[_camel(field)] = value
        return out

    def _task_condition(self, key: str, wanted: Any) -> Callable[[dict], bool]:
        """One tasks.task.list filter entry as a predicate; bad entries raise before any row is read."""
        m = _TASK_FILTER_KEY.match(key)
        field = m.group(2) if m else ""
        if field not in _TASK_INT | _TASK_DATES | {"TITLE", "UF_CRM_TASK"}:
            raise ApiError(400, "0", f"Unknown filter field {key} (filter keys are UPPER_CASE)")
        op = {"!=": "!", "": "="}.get(m.group(1) or "", m.group(1))
        negate = op == "!"
        many = _php_list(wanted)
        if many is not None and (op not in ("=", "!") or field in _TASK_DATES or field == "TITLE"):
            raise ApiError(400, "0", f"Filter {key}: a list of values is only taken by = and ! on ids and statuses")
        values = [wanted] if many is None else many
        if op == "%" and field != "TITLE":
            raise ApiError(400, "0", f"Filter {key}: % is for TITLE only")

        if field in _TASK_INT:
            nums = [_php_int(v) for v in values]
            src = "STATUS" if field == "REAL_STATUS" else field
            if op in ("<", "<=", ">", ">="):
                return lambda rec: _compare(op, int(rec[src]), nums[0])
            if field == "STATUS":  # negative values are the meta-statuses (subStatus), e.g. -1 overdue
                def hit(rec: dict) -> bool:
                    real, sub = int(rec["STATUS"]), int(self._sub_status(rec))
                    return any(sub == n if n < 0 else real == n for n in nums)
            else:
                def hit(rec: dict) -> bool:
                    return int(rec[src]) in nums
            return lambda rec: hit(rec) != negate

        if field in _TASK_DATES:
            if wanted in (None, "", False):  # "no date" / "has a date"
                if op not in ("=", "!"):
                    raise ApiError(400, "0", f"Filter {key}: an empty date only works with = or !")
                return lambda rec: (rec[field] is None) != negate
            when = _parse_iso(wanted)
            if when is None:
                raise ApiError(400, "0", f"Filter {key}: the date must be ISO 8601 with an offset, "
                                         f"e.g. 2026-03-10T23:59:59+03:00; got {_php_str(wanted)!r}")

            def dated(rec: dict) -> bool:
                if rec[field] is None:
                    return negate  # NULL never compares; only "!" keeps such tasks
                return _compare(op, datetime.fromisoformat(rec[field]), when)
            return dated

        if field == "UF_CRM_TASK":
            if op not in ("=", "!"):
                raise ApiError(400, "0", f"Filter {key}: UF_CRM_TASK takes = or ! only")
            if wanted in (None, "", False):
                return lambda rec: (not rec["UF_CRM_TASK"]) != negate
            bindings = {_php_str(v) for v in values}
            return lambda rec: bool(bindings & set(rec["UF_CRM_TASK"])) != negate

        text = _php_str(wanted)  # TITLE: = exact or a LIKE pattern with % and _, % = substring
        if op == "%":
            return lambda rec: text.lower() in rec["TITLE"].lower()
        if op not in ("=", "!"):
            raise ApiError(400, "0", f"Filter {key}: TITLE takes =, ! or %")
        like = re.compile("".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in text), re.I | re.S)
        return lambda rec: (like.fullmatch(rec["TITLE"]) is not None) != negate

    @staticmethod
    def _task_sort(rows: list[dict], order: Any) -> None:
        if order in (None, "", [], {}):
            order = {"ID": "desc"}
        if not isinstance(order, dict):
            raise ApiError(400, "0", "Invalid sorting key")
        steps = []
        for key, direction in order.items():
            if key not in _TASK_ORDER:
                raise ApiError(400, "0", "Invalid sorting key")
            way = _php_str(direction).lower()
            if way not in ("asc", "desc"):
                raise ApiError(400, "0", "Invalid sorting direction")
            steps.append((key, way == "desc"))

        def sort_key(field: str) -> Callable[[dict], tuple]:
            def key(rec: dict) -> tuple:
                if field in _TASK_DATES:  # NULL sorts first ascending, as in SQL
                    value = rec[field]
                    return (0, 0.0) if value is None else (1, datetime.fromisoformat(value).timestamp())
                if field == "TITLE":
                    return (1, rec["TITLE"].lower())
                return (1, int(rec["STATUS" if field == "REAL_STATUS" else field]))
            return key

        rows.sort(key=lambda r: int(r["ID"]))  # ties stay in ID order so pages are stable
        for field, desc in reversed(steps):
            rows.sort(key=sort_key(field), reverse=desc)

    def _m_task_list(self, p: dict, ctx: _Ctx) -> _Page:
        self._task_params("tasks.task.list", p)
        flt = p.get("filter")
        if flt in (None, "", []):
            flt = {}
        if not isinstance(flt, dict):
            raise ApiError(400, "0", "filter must be an object")
        conditions = [self._task_condition(str(k), v) for k, v in flt.items()]
        select = self._task_select(p.get("select"))
        rows = [rec for rec in self._tasks.values() if all(c(rec) for c in conditions)]
        self._task_sort(rows, p.get("order"))
        page = _paginate(rows, p.get("start"))
        return _Page({"tasks": [self._task_out(rec, select) for rec in page.rows]}, page.total, page.next)

    def _m_task_get(self, p: dict, ctx: _Ctx) -> Any:
        self._task_params("tasks.task.get", p)
        tid = self._task_id(p)
        select = self._task_select(p.get("select"))
        rec = self._tasks.get(tid)
        return [] if rec is None else {"task": self._task_out(rec, select)}  # [] = missing or no access

    def _m_task_update(self, p: dict, ctx: _Ctx) -> dict:
        self._task_params("tasks.task.update", p)
        tid = self._task_id(p)
        if "fields" not in p:
            raise ApiError(400, "100", "Could not find value for parameter {fields}")
        fields = p["fields"]
        if not isinstance(fields, dict) or not fields:
            raise ApiError(400, "100", "Invalid value of parameter {fields}: an object with at least one field")
        rec = self._tasks.get(tid)
        if rec is None:
            raise ApiError(400, "0", NOT_ALLOWED_TEXT)
        changes: dict[str, Any] = {}  # validated first: a failing update changes nothing
        for name, value in fields.items():
            if name not in _TASK_UPDATABLE:
                raise ApiError(400, "0", f"Unknown task field {name} (fields are UPPER_CASE)")
            if name == "TITLE":
                if not _opt_str(value).strip():
                    raise _core("Task title is not specified")
                changes[name] = _opt_str(value).strip()
            elif name == "DESCRIPTION":
                changes[name] = _opt_str(value)
            elif name == "RESPONSIBLE_ID":
                user = self._users.get(_php_int(value))
                if user is None or not user["active"]:
                    raise _core("The user specified in the Responsible field was not found")
                changes[name] = str(user["id"])
            elif name == "DEADLINE":
                if value in (None, "", False):
                    changes[name] = None
                    continue
                when = _parse_iso(value, naive_ok=True)  # no offset: read in portal time
                if when is None:
                    raise _core("DEADLINE should be in the ISO-8601 format")
                changes[name] = when.astimezone(PORTAL_TZ).isoformat(timespec="seconds")
            elif name == "STATUS":
                if not re.fullmatch(r"\s*[1-7]\s*", _php_str(value)):
                    raise _core("Invalid status")
                changes[name] = str(int(value))
            elif name == "GROUP_ID":
                gid = _php_int(value)
                if gid and gid not in self._groups:
                    raise _core("Workgroup not found")
                changes[name] = str(gid)
            elif name == "UF_CRM_TASK":
                bindings = _crm_bindings(value)
                if bindings is None:
                    raise _core("UF_CRM_TASK items look like C_12, CO_3, L_7, D_5")
                changes[name] = bindings
            elif name == "PRIORITY":
                if _php_str(value).strip() not in ("0", "1", "2"):
                    raise _core("Invalid priority")
                changes[name] = _php_str(value).strip()
            # SE_PARAMETER is accepted and not modelled.
        self._change_task(rec, changes, ctx)
        return {"task": self._task_out(rec, list(_TASK_FIELDS))}

    def _m_task_complete(self, p: dict, ctx: _Ctx) -> dict:
        self._task_params("tasks.task.complete", p)
        rec = self._tasks.get(self._task_id(p))
        if rec is None or rec["STATUS"] == "5":  # completing is not an allowed action on a completed task
            raise ApiError(400, "0", NOT_ALLOWED_TEXT)
        self._change_task(rec, {"STATUS": "5"}, ctx)
        return {"task": self._task_out(rec, list(_TASK_FIELDS))}

    def _change_task(self, rec: dict, changes: dict, ctx: _Ctx) -> None:
        now = _portal_iso(self.clock())
        if "STATUS" in changes and changes["STATUS"] != rec["STATUS"]:
            rec["CLOSED_DATE"] = now if changes["STATUS"] == "5" else None
        rec.update(changes)
        rec["CHANGED_DATE"], rec["CHANGED_BY"] = now, str(ctx.user_id)

    def _m_comment_add(self, p: dict, ctx: _Ctx) -> int:
        task_id, fields = _ordered_args(p, ("TASKID", "FIELDS"))
        if isinstance(task_id, (bool, dict, list)) or not re.fullmatch(r"\s*\d+\s*", _opt_str(task_id)):
            raise _core("TASKID must be an integer (arguments: TASKID, FIELDS)")
        if not isinstance(fields, dict):
            raise _core("FIELDS must be an object with POST_MESSAGE (arguments: TASKID, FIELDS)")
        tid = int(task_id)
        if tid not in self._tasks:
            raise ApiError(400, "0", NOT_ALLOWED_TEXT)
        message = fields.get("POST_MESSAGE")
        if isinstance(message, (dict, list)) or not _opt_str(message).strip():
            raise _core("POST_MESSAGE is empty")
        author = ctx.user_id
        if fields.get("AUTHOR_ID") not in (None, ""):
            author = _php_int(fields["AUTHOR_ID"])
            if author not in self._users or not self._users[author]["active"]:
                raise _core("AUTHOR_ID: the user is not found or is not active")
        posted = fields.get("POST_DATE")
        if posted in (None, ""):
            post_date = _portal_iso(self.clock())
        else:
            when = _parse_iso(posted)
            if when is None:
                raise _core("POST_DATE should be in the ISO-8601 format")
            post_date = when.astimezone(PORTAL_TZ).isoformat(timespec="seconds")
        self._seq["comment"] += 1
        self._comments.setdefault(tid, []).append({"ID": self._seq["comment"], "POST_MESSAGE": _opt_str(message),
                                                   "AUTHOR_ID": author, "POST_DATE": post_date})
        return self._seq["comment"]

    # ------------------------------------------------------------------ notifications

    def _notify(self, p: dict, ctx: _Ctx, method: str, kind: str) -> int:
        up = {str(k).upper(): v for k, v in p.items()}  # im upper-cases parameter names
        uid = _php_int(up.get("USER_ID"))
        if uid <= 0:
            raise ApiError(400, "USER_ID_EMPTY", "Recipient user ID can't be empty")
        user = self._users.get(uid)
        if user is None or not user["active"]:
            raise ApiError(400, "USER_NOT_FOUND", f"User {uid} is not found or is not active")
        raw = up.get("MESSAGE")
        message = "" if isinstance(raw, (dict, list)) else _opt_str(raw).strip()
        if not message:
            raise ApiError(400, "MESSAGE_EMPTY", "Message can't be empty")
        tag, sub_tag = _opt_str(up.get("TAG")), _opt_str(up.get("SUB_TAG"))
        # TAG uniqueness is per application; a webhook has none, so it must name one (Bitrix24
        # REST docs: im.notify, CLIENT_ID).
        client = _opt_str(up.get("CLIENT_ID")) if ctx.auth == "webhook" else self.client_id
        if (tag or sub_tag) and not client:
            raise ApiError(400, "CLIENT_ID_EMPTY", "CLIENT_ID is required with TAG or SUB_TAG over a webhook")
        attach = up.get("ATTACH")
        if attach in (None, ""):
            attach = None
        else:
            if isinstance(attach, str):
                try:
                    attach = json.loads(attach)
                except ValueError:
                    raise ApiError(400, "ATTACH_ERROR", "Incorrect attach params") from None
            if not isinstance(attach, (dict, list)):
                raise ApiError(400, "ATTACH_ERROR", "Incorrect attach params")
            if len(json.dumps(attach, ensure_ascii=False)) > 60000:
                raise ApiError(400, "ATTACH_OVERSIZE", "You have exceeded the maximum allowable size of attach")
        if tag:  # a new notification with the same TAG removes the previous one
            self._notifications = [n for n in self._notifications
                                   if not (n["TAG"] == tag and n["CLIENT_ID"] == client)]
        self._seq["notify"] += 1
        self._notifications.append({
            "ID": self._seq["notify"], "METHOD": method, "TYPE": kind, "USER_ID": uid,
            "AUTHOR_ID": 0 if kind == "SYSTEM" else ctx.user_id, "MESSAGE": message,
            "MESSAGE_OUT": _opt_str(up.get("MESSAGE_OUT")), "TAG": tag, "SUB_TAG": sub_tag, "ATTACH": attach,
            "CLIENT_ID": client, "DATE": _portal_iso(self.clock()),
        })
        return self._seq["notify"]

    def _m_notify(self, p: dict, ctx: _Ctx) -> int:
        kind = _opt_str({str(k).upper(): v for k, v in p.items()}.get("TYPE")).upper()
        return self._notify(p, ctx, "im.notify", "SYSTEM" if kind == "SYSTEM" else "USER")

    def _m_notify_system(self, p: dict, ctx: _Ctx) -> int:
        return self._notify(p, ctx, "im.notify.system.add", "SYSTEM")

    def _m_notify_personal(self, p: dict, ctx: _Ctx) -> int:
        return self._notify(p, ctx, "im.notify.personal.add", "USER")

    # ------------------------------------------------------------------ workday

    def _m_timeman_status(self, p: dict, ctx: _Ctx) -> dict:
        up = {str(k).upper(): v for k, v in p.items()}
        uid = _php_int(up["USER_ID"]) if "USER_ID" in up else ctx.user_id
        user = self._users.get(uid)
        if user is None:
            raise ApiError(400, "", "User not found")
        state = user["timeman"] if user["timeman"] in ("OPENED", "CLOSED", "PAUSED", "EXPIRED") else "CLOSED"
        start, finish = user["day_start"], user["day_finish"]
        closed = state == "CLOSED" and start is not None and finish is not None
        return {"STATUS": state, "TIME_START": _portal_iso(start) if start is not None else None,
                "TIME_FINISH": _portal_iso(finish) if closed else None,
                "DURATION": _hms(finish - start) if closed else "00:00:00", "TIME_LEAKS": "00:00:00",
                "ACTIVE": True, "IP_OPEN": "", "IP_CLOSE": "", "LAT_OPEN": 0, "LON_OPEN": 0, "LAT_CLOSE": 0,
                "LON_CLOSE": 0, "TZ_OFFSET": 10800}

    # ------------------------------------------------------------------ REST events: Python API

    @property
    def event_bindings(self) -> list[dict]:
        with self._lock:
            return [{k: b[k] for k in ("event", "handler", "event_type", "auth_type")} for b in self._bindings]

    @property
    def offline_events(self) -> list[dict]:
        """The offline queue as event.offline.get shows it, plus PROCESS_ID (taken by a clear=0 call,
        else None) and ERROR (marked by event.offline.error)."""
        with self._lock:
            return [dict(self._offline_row(r), PROCESS_ID=r["PROCESS_ID"], ERROR=r["ERROR"])
                    for r in self._offline]

    @property
    def event_deliveries(self) -> list[dict]:
        """Finished online deliveries: {"url", "event", "status" (None: no answer), "seconds", "error"}."""
        with self._lock:
            return copy.deepcopy(self._deliveries)

    def wait_deliveries(self, count: int, timeout: float = 5.0) -> bool:
        """Block until at least ``count`` online deliveries have finished; False on timeout."""
        with self._delivered:
            return self._delivered.wait_for(lambda: len(self._deliveries) >= count, timeout)

    def click_to_call(self, user_id: int, phone: str, *, crm: tuple[str, int] | None = None,
                      line_number: str = "", call_list_id: int = 0, is_mobile: bool = False) -> dict:
        """A user clicks ``phone`` in the CRM with this app as his outgoing line: the portal registers
        the call itself (TYPE 1) and sends ONEXTERNALCALLSTART with its CALL_ID. Returns the event data."""
        crm_arg = _crm_arg(crm)
        with self._lock:
            uid = int(user_id)
            user = self._users.get(uid)
            if user is None or not user["active"]:
                raise ValueError(f"user {user_id} is not found or is not active")
            line = self._lines.get(line_number) if line_number else None
            auto = line["CRM_AUTO_CREATE"] if line is not None else "Y"  # the line setting's default
            params: dict[str, Any] = {"USER_ID": uid, "PHONE_NUMBER": phone, "TYPE": 1, "LINE_NUMBER": line_number,
                                      "CRM_CREATE": 1 if auto == "Y" else 0, "SHOW": 1,
                                      "CALL_LIST_ID": int(call_list_id)}
            if crm_arg is not None:
                params["CRM_ENTITY_TYPE"], params["CRM_ENTITY_ID"] = crm_arg
            try:
                # The portal's own registration: not de-duplicated, so every click is a new call.
                reg = self._m_register(params, _Ctx(uid, "portal"), dedup=False)
            except ApiError as err:
                raise ValueError(err.description) from None
            digits = normalize_digits(phone)
            data = {
                "PHONE_NUMBER": str(phone), "PHONE_NUMBER_INTERNATIONAL": "+" + digits if digits else "",
                "EXTENSION": user["inner"] or "", "USER_ID": str(uid), "CALL_LIST_ID": str(int(call_list_id)),
                "LINE_NUMBER": line_number, "IS_MOBILE": "1" if is_mobile else "0", "CALL_ID": reg["CALL_ID"],
                "CRM_ENTITY_TYPE": reg["CRM_ENTITY_TYPE"] or "",
                "CRM_ENTITY_ID": "" if reg["CRM_ENTITY_ID"] is None else str(reg["CRM_ENTITY_ID"]),
            }
            jobs = self._emit("ONEXTERNALCALLSTART", data, uid)
        self._start_deliveries(jobs)
        return dict(data)

    def callback_request(self, phone: str, *, text: str = "", crm: tuple[str, int] | None = None,
                         line_number: str = "") -> dict:
        """A site visitor fills the CRM callback form whose line is this app: ONEXTERNALCALLBACKSTART
        (no CALL_ID: the app registers the call itself). No user triggered it, so handlers bound
        without auth_type get no tokens. Returns the event data."""
        crm_arg = _crm_arg(crm)
        data = {"PHONE_NUMBER": str(phone), "TEXT": text, "VOICE": "",
                "CRM_ENTITY_TYPE": crm_arg[0] if crm_arg else "", "CRM_ENTITY_ID": str(crm_arg[1]) if crm_arg else "",
                "LINE_NUMBER": line_number}
        with self._lock:
            jobs = self._emit("ONEXTERNALCALLBACKSTART", data, None)
        self._start_deliveries(jobs)
        return dict(data)

    def install_app(self, handler_url: str) -> int:
        """The administrator installs the app: its old bindings are dropped (re-bind in the installer)
        and the installation callback is POSTed with a fresh token pair. Returns the handler's HTTP
        status (0 when it did not answer)."""
        _require_loopback(handler_url)
        with self._lock:
            self._bindings.clear()
            self._placements.clear()
            tokens = self._issue_pair(self.webhook_user_id)
            auth = self._event_auth(tokens["access_token"])
            auth["refresh_token"] = tokens["refresh_token"]  # long-term access only comes with install
            pairs = self._event_pairs("ONAPPINSTALL", None,
                                      {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"}, auth)
        status, _ = _post_form(handler_url, pairs, self.delivery_timeout)
        return status or 0

    def post_event(self, url: str, event: str, data: dict, *, application_token: str | None = None,
                   member_id: str | None = None, auth_extra: dict | None = None, ts: float | None = None) -> int:
        """POST an event in the portal's format, as given (forged tokens included: refusing them is the
        receiver's job). auth carries no OAuth tokens unless ``auth_extra`` adds them; a None value in
        ``auth_extra`` drops that key; ``ts``: when the event was raised (one event delivered again
        keeps its ts). Returns the HTTP status (0 when nothing answered)."""
        _require_loopback(url)
        with self._lock:
            auth = self._event_auth(None)
            auth["member_id"] = self.member_id if member_id is None else member_id
            auth["application_token"] = self.application_token if application_token is None else application_token
            for key, value in (auth_extra or {}).items():
                if value is None:
                    auth.pop(key, None)
                else:
                    auth[key] = value
            name = str(event).upper()
            bound = [b for b in self._bindings if b["event"] == name and b["handler"] == url]
            pairs = self._event_pairs(name, bound[0]["id"] if bound else None, data, auth, ts)
        status, _ = _post_form(url, pairs, self.delivery_timeout)
        return status or 0

    # ------------------------------------------------------------------ REST events: delivery

    def _event_auth(self, access_token: str | None) -> dict[str, Any]:
        """auth[...] of an event; without a user's token only the portal/app identity is sent."""
        auth: dict[str, Any] = {}
        if access_token is not None:
            auth.update({"access_token": access_token, "expires_in": str(ACCESS_TTL), "scope": ",".join(self.scopes)})
        auth.update({"domain": self.domain, "server_endpoint": self.server_endpoint,
                     "client_endpoint": self.client_endpoint, "member_id": self.member_id})
        if access_token is not None:
            auth["status"] = "L"
        auth["application_token"] = self.application_token
        return auth

    def _event_pairs(self, event: str, handler_id: int | None, data: Any, auth: dict,
                     ts: float | None = None) -> list[tuple[str, str]]:
        """`ts`: when the event was raised, the same in the POST to every handler bound to it."""
        pairs = [("event", event)]
        if handler_id is not None:
            pairs.append(("event_handler_id", str(handler_id)))
        pairs += _form_pairs("data", data)
        pairs.append(("ts", str(int(self.clock() if ts is None else ts))))
        pairs += _form_pairs("auth", auth)
        return pairs

    def _issue_access(self, user_id: int) -> str:
        """An access token for an event (no refresh token: call events give none)."""
        token = secrets.token_hex(24)
        self._access[token] = {"user_id": user_id, "expires": self.clock() + ACCESS_TTL, "state": "ok",
                               "app": self.client_id}
        return token

    def _emit(self, event: str, data: dict, user_id: int | None) -> list[tuple[str, str, list]]:
        """Under the lock: queue offline copies and build online deliveries (sent by the caller after
        releasing the lock, since a handler may call straight back into this portal)."""
        jobs: list[tuple[str, str, list]] = []
        raised = self.clock()
        for b in self._bindings:
            if b["event"] != event:
                continue
            if b["event_type"] == "offline":
                self._queue_offline(event, data)
                continue
            # auth_type names whose tokens the handler gets; 0 = the user who triggered the event.
            uid = b["auth_type"] or user_id
            auth = self._event_auth(self._issue_access(uid) if uid else None)
            jobs.append((b["handler"], event, self._event_pairs(event, b["id"], data, auth, raised)))
        return jobs

    def _queue_offline(self, event: str, data: dict) -> None:
        message_id = hashlib.md5(f"{event}|{json.dumps(data, sort_keys=True)}".encode()).hexdigest()
        now = self.clock()
        for rec in self._offline:
            # The queue keeps one record per change: a repeat not yet taken only refreshes it.
            if (rec["EVENT_NAME"] == event and rec["MESSAGE_ID"] == message_id and rec["PROCESS_ID"] is None
                    and not rec["ERROR"]):
                rec["ts"], rec["EVENT_DATA"] = now, copy.deepcopy(data)
                return
        self._seq["offline"] += 1
        self._offline.append({"ID": self._seq["offline"], "ts": now, "EVENT_NAME": event,
                              "EVENT_DATA": copy.deepcopy(data), "EVENT_ADDITIONAL": False,
                              "MESSAGE_ID": message_id, "PROCESS_ID": None, "ERROR": False})

    def _start_deliveries(self, jobs: list[tuple[str, str, list]]) -> None:
        for url, event, pairs in jobs:
            threading.Thread(target=self._deliver, args=(url, event, pairs), daemon=True,
                             name=f"bitrix24-emulator-event:{event}").start()

    def _deliver(self, url: str, event: str, pairs: list[tuple[str, str]]) -> None:
        t0 = time.perf_counter()
        status, error = _post_form(url, pairs, self.delivery_timeout)
        with self._delivered:
            # No retries, like the portal's queue: a failed delivery is only recorded.
            self._deliveries.append({"url": url, "event": event, "status": status,
                                     "seconds": round(time.perf_counter() - t0, 6), "error": error})
            self._delivered.notify_all()

    # ------------------------------------------------------------------ REST events: methods

    @staticmethod
    def _upper_keys(p: dict) -> dict[str, Any]:
        return {str(k).upper(): v for k, v in p.items()}  # event.* read parameter names in any case

    def _m_event_bind(self, p: dict, ctx: _Ctx) -> bool:
        up = self._upper_keys(p)
        event = _opt_str(up.get("EVENT")).strip().upper()
        if not event:
            raise ApiError(400, "INVALID_ARGUMENT", "event is required")
        if event not in _EVENTS or (_EVENTS[event] is not None and _EVENTS[event] not in self.scopes):
            raise ApiError(400, "ERROR_EVENT_NOT_FOUND", "Event not found")
        event_type = _opt_str(up.get("EVENT_TYPE")).strip().lower() or "online"
        if event_type not in ("online", "offline"):
            raise ApiError(400, "INVALID_ARGUMENT", "event_type must be online or offline")
        handler = ""
        if event_type == "online":  # offline events are fetched by the app: no handler
            handler = _opt_str(up.get("HANDLER")).strip()
            if not handler:
                raise ApiError(400, "INVALID_ARGUMENT", "handler is required")
            parts = urllib.parse.urlsplit(handler)
            if not parts.hostname or not (parts.scheme == "https" or
                                          (parts.scheme == "http" and parts.hostname in _LOOPBACK)):
                raise ApiError(400, "INVALID_ARGUMENT", "Wrong handler URL: https is required (http only on loopback)")
        auth_type = max(0, _php_int(up.get("AUTH_TYPE")))
        for b in self._bindings:
            if (b["event"], b["handler"], b["auth_type"], b["event_type"]) == (event, handler, auth_type, event_type):
                raise _core("Handler already binded")
        self._seq["handler"] += 1
        self._bindings.append({"id": self._seq["handler"], "event": event, "handler": handler,
                               "event_type": event_type, "auth_type": auth_type})
        return True

    def _m_event_get(self, p: dict, ctx: _Ctx) -> list[dict]:
        return [{"event": b["event"], "handler": b["handler"], "auth_type": str(b["auth_type"]),
                 "offline": 1 if b["event_type"] == "offline" else 0} for b in self._bindings]

    def _m_event_unbind(self, p: dict, ctx: _Ctx) -> dict:
        up = self._upper_keys(p)
        event = _opt_str(up.get("EVENT")).strip().upper()
        if not event:
            raise ApiError(400, "INVALID_ARGUMENT", "event is required")
        event_type = _opt_str(up.get("EVENT_TYPE")).strip().lower() or "online"
        if event_type not in ("online", "offline"):
            raise ApiError(400, "INVALID_ARGUMENT", "event_type must be online or offline")
        handler = _opt_str(up.get("HANDLER")).strip()
        # Strict: the docs mark handler required, so no mass removal of online handlers by event alone.
        if event_type == "online" and not handler:
            raise ApiError(400, "INVALID_ARGUMENT", "handler is required")
        auth_type = max(0, _php_int(up["AUTH_TYPE"])) if "AUTH_TYPE" in up else None

        def hit(b: dict) -> bool:
            return (b["event"] == event and b["event_type"] == event_type
                    and (event_type == "offline" or b["handler"] == handler)
                    and (auth_type is None or b["auth_type"] == auth_type))

        kept = [b for b in self._bindings if not hit(b)]
        count = len(self._bindings) - len(kept)
        self._bindings = kept
        return {"count": count}

    def _offline_row(self, rec: dict) -> dict:
        return {"ID": str(rec["ID"]), "TIMESTAMP_X": _portal_iso(rec["ts"]), "EVENT_NAME": rec["EVENT_NAME"],
                "EVENT_DATA": copy.deepcopy(rec["EVENT_DATA"]),
                "EVENT_ADDITIONAL": copy.deepcopy(rec["EVENT_ADDITIONAL"]),
                "MESSAGE_ID": rec["MESSAGE_ID"]}

    @staticmethod
    def _offline_value(rec: dict, field: str) -> Any:
        return {"ID": rec["ID"], "TIMESTAMP_X": rec["ts"], "EVENT_NAME": rec["EVENT_NAME"],
                "MESSAGE_ID": rec["MESSAGE_ID"]}[field]

    @staticmethod
    def _offline_operand(field: str, value: Any) -> Any:
        if isinstance(value, (dict, list)):
            raise ApiError(400, "INVALID_ARGUMENT", f"filter value for {field} must be a scalar")
        if field == "ID":
            text = _opt_str(value).strip()
            if not re.fullmatch(r"\d+", text):
                raise ApiError(400, "INVALID_ARGUMENT", f"filter value for ID must be an integer, got {value!r}")
            return int(text)
        if field == "TIMESTAMP_X":
            when = _parse_iso(value)
            if when is None:
                raise ApiError(400, "INVALID_ARGUMENT", "filter value for TIMESTAMP_X must be ISO 8601 with an offset")
            return when.timestamp()
        return _opt_str(value).upper() if field == "EVENT_NAME" else _opt_str(value)

    def _offline_filter(self, flt: Any) -> Callable[[dict], bool]:
        if flt in (None, "", []):
            return lambda rec: True
        if not isinstance(flt, dict):
            raise ApiError(400, "INVALID_ARGUMENT", "filter must be an object")
        tests: list[Callable[[dict], bool]] = []
        for key, wanted in flt.items():
            m = _OFFLINE_FILTER_KEY.match(str(key))
            field = m.group(2).upper() if m else ""
            if field not in _OFFLINE_FIELDS:  # strict: only the documented fields
                raise ApiError(400, "INVALID_ARGUMENT", f"Unknown filter field {key}")
            op = (m.group(1) if m else "") or "="
            operand = self._offline_operand(field, wanted)
            tests.append(lambda rec, f=field, o=op, w=operand: _compare("!" if o == "!=" else o,
                                                                         self._offline_value(rec, f), w))
        return lambda rec: all(t(rec) for t in tests)

    def _offline_sort(self, rows: list[dict], order: Any) -> None:
        if order in (None, "", []):
            order = {"TIMESTAMP_X": "ASC"}
        if not isinstance(order, dict):
            raise ApiError(400, "INVALID_ARGUMENT", "order must be an object")
        rows.sort(key=lambda r: r["ID"])
        for field, direction in reversed(list(order.items())):
            name, how = str(field).upper(), _opt_str(direction).upper()
            if name not in _OFFLINE_FIELDS or how not in ("ASC", "DESC"):
                raise ApiError(400, "INVALID_ARGUMENT", f"Wrong order {field}: {direction}")
            rows.sort(key=lambda r, n=name: self._offline_value(r, n), reverse=how == "DESC")

    def _m_offline_get(self, p: dict, ctx: _Ctx) -> dict:
        up = self._upper_keys(p)
        clear = _php_int(up.get("CLEAR", 1)) != 0
        with_errors = _php_int(up.get("ERROR", 0)) != 0
        limit = _php_int(up.get("LIMIT", OFFLINE_LIMIT))
        limit = OFFLINE_LIMIT if limit <= 0 else min(limit, OFFLINE_LIMIT)  # strict: never more than 50
        process_id = _opt_str(up.get("PROCESS_ID")).strip() or None
        wanted = self._offline_filter(up.get("FILTER"))
        # Records taken by another process (clear=0) stay hidden until cleared or marked as errors.
        fresh = [r for r in self._offline
                 if r["PROCESS_ID"] is None and (with_errors or not r["ERROR"]) and wanted(r)]
        self._offline_sort(fresh, up.get("ORDER"))
        taken = fresh[:limit]
        if clear:  # default: what is returned is gone from the queue at once
            chosen = taken + [r for r in self._offline if process_id is not None and r["PROCESS_ID"] == process_id]
            self._offline = [r for r in self._offline if not any(r is c for c in chosen)]
            self._offline_sort(chosen, up.get("ORDER"))
            return {"process_id": process_id, "events": [self._offline_row(r) for r in chosen]}
        # clear=0: the records stay, hidden under a process id until event.offline.clear/error.
        pid = process_id or secrets.token_hex(16)
        for rec in taken:
            rec["PROCESS_ID"] = pid
        # A known process_id gets its earlier, still uncleared records again together with the new ones.
        mine = [r for r in self._offline if r["PROCESS_ID"] == pid]
        self._offline_sort(mine, up.get("ORDER"))
        return {"process_id": pid, "events": [self._offline_row(r) for r in mine]}

    @staticmethod
    def _offline_process(up: dict) -> str:
        pid = up.get("PROCESS_ID")
        if isinstance(pid, (dict, list)) or not _opt_str(pid).strip():
            raise ApiError(400, "INVALID_ARGUMENT", "process_id is required")
        return _opt_str(pid).strip()

    def _m_offline_clear(self, p: dict, ctx: _Ctx) -> bool:
        up = self._upper_keys(p)
        pid = self._offline_process(up)
        ids = _int_list(up.get("ID")) if up.get("ID") not in (None, "", []) else None
        raw_messages = up.get("MESSAGE_ID")
        messages = None
        if ids is None and raw_messages not in (None, "", []):  # message_id is ignored when id is given
            listed = _php_list(raw_messages)
            messages = {_opt_str(m) for m in (listed if listed is not None else [raw_messages])}

        def hit(r: dict) -> bool:
            return (r["PROCESS_ID"] == pid and (ids is None or r["ID"] in ids)
                    and (messages is None or r["MESSAGE_ID"] in messages))

        self._offline = [r for r in self._offline if not hit(r)]
        return True

    def _m_offline_error(self, p: dict, ctx: _Ctx) -> bool:
        up = self._upper_keys(p)
        pid = self._offline_process(up)
        raw_messages = up.get("MESSAGE_ID")
        messages = None
        if raw_messages not in (None, "", []):
            listed = _php_list(raw_messages)
            messages = {_opt_str(m) for m in (listed if listed is not None else [raw_messages])}
        for r in self._offline:
            if r["PROCESS_ID"] == pid and (messages is None or r["MESSAGE_ID"] in messages):
                # Released from the process with an error mark: event.offline.get error=1 returns it.
                r["PROCESS_ID"], r["ERROR"] = None, True
        return True


# --------------------------------------------------------------------------- module helpers

def _batch_map(d: dict, listy: bool) -> Any:
    if not d:
        return []  # PHP serializes an empty array as [] (clients must accept [] and {})
    if listy and list(d) == list(range(len(d))):
        return [d[i] for i in range(len(d))]
    return {str(k): v for k, v in d.items()}


def _paginate(rows: list, start: Any) -> _Page:
    offset = _php_int(start)
    if offset == -1:  # fast mode: no COUNT, no next
        return _Page(rows[:PAGE_SIZE], 0, None)
    offset = max(0, offset)
    page = rows[offset:offset + PAGE_SIZE]
    nxt = offset + PAGE_SIZE if offset + PAGE_SIZE < len(rows) else None
    return _Page(page, len(rows), nxt)


def _eq(row_value: Any, wanted: Any) -> bool:
    if isinstance(wanted, list):
        return any(_eq(row_value, w) for w in wanted)
    if isinstance(row_value, list):
        return any(_eq(r, wanted) for r in row_value)
    if isinstance(row_value, bool):
        return row_value == _yes(wanted)
    if row_value is None or row_value == "":
        return wanted in (None, "", False)
    return str(row_value) == _php_str(wanted)


def _filter_match(row: dict, key: str, wanted: Any) -> bool:
    m = _FILTER_KEY.match(str(key))
    if not m:
        return True
    op, field = m.group(1) or "", m.group(2).upper()
    if field not in row:
        return True  # unknown filter fields are ignored
    value = row[field]
    empty_wanted = wanted in (None, "", False)
    if op in ("", "="):
        return _eq(value, wanted)
    if op in ("!", "!="):
        if empty_wanted:  # `!FIELD: ""` / false means "field is set"
            return value not in (None, "", [])
        return not _eq(value, wanted)
    if op in ("@", "!@"):
        items = wanted if isinstance(wanted, list) else (
            list(wanted.values()) if isinstance(wanted, dict) else str(wanted).split(","))
        hit = any(_eq(value, str(i).strip()) for i in items)
        return hit if op == "@" else not hit
    if op in ("%", "!%"):
        hit = _php_str(wanted).lower() in _php_str(value).lower()
        return hit if op == "%" else not hit
    try:
        a, b = float(_php_str(value)), float(_php_str(wanted))
    except ValueError:
        return False
    return {">": a > b, "<": a < b, ">=": a >= b, "<=": a <= b}[op]


def _compare(op: str, a: Any, b: Any) -> bool:
    return {"=": a == b, "!": a != b, ">": a > b, "<": a < b, ">=": a >= b, "<=": a <= b}[op]


def _ordered_args(p: dict, names: tuple[str, ...]) -> list[Any]:
    """Arguments of a legacy task.* method, by position ("0", "1", ...) or by name. The server reads
    them in order, so named arguments out of signature order (or unknown names) are refused."""
    by_key: dict[str, Any] = {}
    named: list[str] = []
    for key, value in p.items():
        k = str(key).upper()
        if not re.fullmatch(r"\d+", k):
            if k not in names:
                raise _core(f"Unknown argument {key}; expected {', '.join(names)} or positions 0..{len(names) - 1}")
            named.append(k)
        by_key[k] = value
    if named != sorted(named, key=names.index):
        raise _core(f"Arguments must come in the order {', '.join(names)}")
    return [by_key[str(i)] if str(i) in by_key else by_key.get(name) for i, name in enumerate(names)]


def _fetch_loopback(url: str) -> bytes:
    """Download a record the way the portal would; only loopback URLs, never the internet."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise _core("Server returns HTTP error code 0")  # the cloud cannot reach it
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (loopback only)
            if resp.status != 200:
                raise _core(f"Server returns HTTP error code {resp.status}")
            return resp.read()
    except urllib.error.HTTPError as err:
        raise _core(f"Server returns HTTP error code {err.code}") from None
    except (urllib.error.URLError, OSError):
        raise _core("Server returns HTTP error code 0") from None


def _crm_arg(crm: tuple[str, int] | None) -> tuple[str, int] | None:
    """Validate a ``(type, id)`` CRM binding given to click_to_call / callback_request."""
    if crm is None:
        return None
    etype, eid = str(crm[0]).upper(), int(crm[1])
    if etype not in _CRM_TYPES or eid <= 0:
        raise ValueError(f"crm must be (CONTACT|COMPANY|LEAD, id > 0), got {crm!r}")
    return etype, eid


def _require_loopback(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in _LOOPBACK:
        raise ValueError(f"the emulator only posts to loopback handlers, got {url!r}")


def _form_pairs(key: str, value: Any) -> list[tuple[str, str]]:
    """PHP-style form pairs, as http_build_query writes them: ``data[FIELDS][ID]=5``."""
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return [(key, _php_str(value))]
    out: list[tuple[str, str]] = []
    for k, v in items:  # an empty array yields no pair at all, as in PHP
        out += _form_pairs(f"{key}[{k}]", v)
    return out


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The queue server reports a redirect as the handler's answer; it does not follow it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _post_form(url: str, pairs: list[tuple[str, str]], timeout: float) -> tuple[int | None, str | None]:
    """POST form-encoded to a loopback handler -> (HTTP status or None, error text or None)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in _LOOPBACK:
        return None, "not delivered: the emulator only reaches loopback handlers"
    request = urllib.request.Request(url, data=urllib.parse.urlencode(pairs).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded",
                                              "User-Agent": "Bitrix24 Webhook Engine"})
    # No proxies: a proxy from the environment must not see (or swallow) loopback traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    try:
        with opener.open(request, timeout=timeout) as resp:  # noqa: S310 (loopback only)
            resp.read()
            return resp.status, None
    except urllib.error.HTTPError as err:
        err.close()
        return err.code, None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return None, f"{type(reason).__name__}: {reason}"


# --------------------------------------------------------------------------- HTTP plumbing

def _ephemeral_low() -> int:
    """The first port the kernel hands out for outgoing connections (Linux ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return max(10001, int(fh.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    emulator: Bitrix24Emulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections (timeouts, stop()) are normal here; stay quiet.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real portal behind nginx
    server_version = "Bitrix24Emulator/1.0"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.emulator._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.emulator._track(self.connection, False)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def _serve(self, verb: str) -> None:
        emulator = self.server.emulator
        body = self._read_body()
        status, payload, ctype = emulator._dispatch_http(verb, self.path, self.headers, body)
        if emulator._stopping.is_set():
            self.close_connection = True  # stopped meanwhile: drop the connection unanswered
            return
        # Head and body in one write: written apart, the body is a second small segment that
        # Nagle's algorithm holds back until the client's delayed ACK of the head (about 40 ms
        # per request on a kept-alive connection, RFC 896 and RFC 1122 4.2.3.2).
        self.log_request(status)
        head = (f"{self.protocol_version} {status} {self.responses.get(status, ('',))[0]}\r\n"
                f"Server: {self.version_string()}\r\nDate: {self.date_time_string()}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n\r\n")
        self.wfile.write(head.encode("latin-1") + payload)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (quiet: tests read `requests`)
        pass


# --------------------------------------------------------------------------- manual use

def main(argv: list[str] | None = None) -> int:
    """Serve a seeded emulator until Ctrl-C (for trying the script by hand)."""
    parser = argparse.ArgumentParser(prog="python -m agi_bitrix.testing.bitrix_emulator",
                                     description="Local Bitrix24 REST emulator for agi-bitrix.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--bucket-size", type=int, default=None, help="enable the leaky bucket (e.g. 50)")
    parser.add_argument("--drain", type=float, default=2.0, help="bucket drain per second")
    args = parser.parse_args(argv)

    emulator = Bitrix24Emulator(host=args.host, port=args.port, bucket_size=args.bucket_size,
                                drain_per_second=args.drain)
    emulator.start()
    emulator.add_user("Portal", "Admin", inner="100", user_id=emulator.webhook_user_id)
    emulator.add_user("Anna", "Operator", inner="101")
    emulator.add_user("Boris", "Operator", inner="102")
    emulator.add_contact("Ivan Petrov", ["+79161234567"], assigned_by_id=2)
    emulator.add_group("CallCenter", [2, 3], owner_id=1)
    emulator.add_task("Call the client", 2, group_id=1, crm=["C_1"],
                      deadline=datetime.now(PORTAL_TZ).replace(microsecond=0))
    tokens = emulator.issue_tokens()
    print(f"Bitrix24 emulator on {emulator.base_url}", flush=True)
    print(f"  webhook_url   = {emulator.webhook_url}")
    print(f"  portal_url    = {emulator.base_url}/  client_id = {emulator.client_id}  "
          f"client_secret = {emulator.client_secret}")
    print(f"  oauth_url     = {emulator.oauth_url}")
    print(f"  refresh_token = {tokens['refresh_token']}")
    print(f"  application_token = {emulator.application_token}  member_id = {emulator.member_id}")
    print("  users: 1 Portal Admin (100), 2 Anna (101), 3 Boris (102); contact +79161234567 -> Anna")
    print("  workgroup 1 CallCenter (Anna, Boris); task 1 'Call the client' -> Anna, bound to C_1, due now")
    print("Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
