"""Settings: settings.ini, a .env beside it, and AGI_BITRIX_<SECTION>_<KEY> overrides.

Precedence (highest first): process environment, .env beside the settings file, settings.ini,
defaults. One clear, one-line error for anything wrong (SettingsError). Reading the sources and
the validated settings kept for the call steps: settings_file.py.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, Literal, Optional
from urllib.parse import urlsplit

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from agi_bitrix import settings_file
from agi_bitrix.settings_file import (  # noqa: F401 - the public names of the settings, kept here
    DEFAULT_PATH, DEFAULT_STATE_DIR, ENV_PATH_VAR, ENV_PREFIX, OAUTH_KEYS, SECTIONS, Bitrix24Rules, DialerRules,
    SettingsError, SettingsRules, Sources, StorageRules, record_file, recorded_path, settings_path)

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _yes_no(value: object) -> object:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in {"yes", "y", "true", "1", "on"}:
            return True
        if low in {"no", "n", "false", "0", "off", ""}:
            return False
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def checked_url(value: str) -> str:
    """A Bitrix24 or OAuth server address: https (plain http only on loopback), ends in '/'."""
    if not value:
        return value
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError("must be a full https:// address")
    # Bitrix24 refuses plain HTTP; only a local emulator may use it.
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError("Bitrix24 requires https://")
    return value if value.endswith("/") else value + "/"


WEBHOOK_SHAPE = "https://PORTAL/rest/USER_ID/CODE/"


def checked_webhook(value: str) -> str:
    """An inbound webhook is https://PORTAL/rest/USER_ID/CODE/ and nothing after it (Bitrix24 REST
    docs: inbound webhooks); the method name is appended per request."""
    if not value:
        return value
    parts = [p for p in urlsplit(value).path.split("/") if p]
    if not parts or parts[0] != "rest" or len(parts) < 3:
        raise ValueError(f"must look like {WEBHOOK_SHAPE} (copy it from the inbound webhook's page in Bitrix24)")
    if len(parts) > 3:
        raise ValueError(f"ends with a method ({'/'.join(parts[3:])}): remove it, keep {WEBHOOK_SHAPE}")
    return value


class Bitrix24Settings(Bitrix24Rules, _Section):
    webhook_url: str = ""
    portal_url: str = ""
    client_id: str = ""
    client_secret: str = ""
    oauth_url: str = "https://oauth.bitrix.info/oauth/token/"
    timeout: float = Field(2.0, gt=0, le=60)
    # The PBX-wide request budget per portal (leaky bucket, Bitrix24 REST docs: limits). The portal allows a
    # burst of 50 draining 2/s (Enterprise 250 and 5/s) per source IP; keep headroom for others.
    rate_burst: int = Field(40, ge=1, le=10000)
    rate_per_second: float = Field(2.0, gt=0, le=1000)

    @field_validator("webhook_url", "portal_url", "oauth_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return checked_url(value)

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, value: str) -> str:
        return checked_webhook(value)


class CallsSettings(_Section):
    default_user: str = ""
    crm_create: bool = True
    route_to_responsible: bool = False
    line_number: str = ""
    anonymous_number: str = "0000"
    region: str = "RU"
    recording_url: str = ""
    missed_calls_user: str = ""          # inner number that owns unanswered incoming calls
    route_cache: float = Field(300.0, ge=0, le=86400)   # seconds a manager lookup per number is reused
    route_timeout: float = Field(0.8, gt=0, le=30)      # seconds the lookup may take on the ring path
    route_only_workday: bool = False     # route to the manager only while his workday is open
    # A call whose hangup step never ran (a step killed, the PBX restarted) is closed this many
    # seconds after it started, with its best known status.
    max_call_length: int = Field(14400, ge=60, le=7 * 86400)

    @field_validator("crm_create", "route_to_responsible", "route_only_workday", mode="before")
    @classmethod
    def _flags(cls, value: object) -> object:
        return _yes_no(value)

    @field_validator("default_user", "missed_calls_user")
    @classmethod
    def _inner(cls, value: str) -> str:
        if value and not re.fullmatch(r"[0-9*#]{1,20}", value):
            raise ValueError("must be an inner (extension) number such as 101")
        return value

    @field_validator("recording_url")
    @classmethod
    def _recording_url(cls, value: str) -> str:
        if value and (not re.match(r"https?://", value) or "{name}" not in value):
            raise ValueError("must be an http(s) address containing {name}, e.g. https://pbx.example.com/rec/{name}")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z]{2}", value):
            raise ValueError("must be a two-letter country code such as RU")
        return value.upper()

    @field_validator("anonymous_number")
    @classmethod
    def _anon(cls, value: str) -> str:
        # Bitrix24 keeps only 0-9 # * + , ; of a number: it needs at least one digit.
        if not re.search(r"[0-9]", value):
            raise ValueError("must contain digits, e.g. 0000 (Bitrix24 rejects numbers without digits)")
        return value


class StorageSettings(StorageRules, _Section):
    state_dir: str = DEFAULT_STATE_DIR
    retention_days: float = Field(7.0, ge=1, le=3650)  # history kept in the database, then pruned
    # Empty: everything in SQLite under state_dir (one PBX). postgresql://USER:PASSWORD@HOST/DB: the
    # state several PBXs of one portal share (call state, outbox, tokens, request budget, dialer);
    # state_dir then keeps the local journal a call step falls back on while PostgreSQL is sick.
    url: str = Field("", repr=False)
    pbx_id: str = ""  # this PBX's name in the shared store; every key there carries it
    db_timeout: float = Field(1.0, gt=0, le=30)  # seconds a call step gives PostgreSQL before its local journal

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be empty (SQLite) or postgresql://USER:PASSWORD@HOST:5432/DATABASE")
        return value

    @field_validator("pbx_id")
    @classmethod
    def _pbx_id(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", value):
            raise ValueError("letters, digits, _ . - only, up to 40 (e.g. office-1)")
        return value

    @model_validator(mode="after")
    def _named(self) -> "StorageSettings":
        if self.url and not self.pbx_id:
            raise ValueError("pbx_id must name this PBX (e.g. office-1) when url is set: several PBXs share "
                             "that database and every key there carries the PBX")
        return self


class LoggingSettings(_Section):
    file: str = "/var/log/agi-bitrix/agi-bitrix.log"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # The language of the admin commands' texts; auto = the locale (LC_ALL, LC_MESSAGES, LANG).
    language: Literal["auto", "ru", "en"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("language", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


def _inner_template(value: str) -> str:
    """How an employee's phone is dialed: {inner} once, nothing that could add a Dial target."""
    if value.count("{inner}") != 1 or re.search(r"[\s,&\"\\]", value):
        raise ValueError("must contain {inner} once and no spaces, commas or '&', e.g. PJSIP/{inner}")
    return value


class AsteriskSettings(_Section):
    dial_template: str = "PJSIP/{number}@provider"
    dial_timeout: int = Field(60, ge=1, le=3600)
    dial_options: str = ""
    number_format: Literal["e164", "e164_digits", "national"] = "e164"
    phone_channel: str = "PJSIP/{inner}"  # an employee's phone, for click-to-call and the callback form
    ami_host: str = "127.0.0.1"
    ami_port: int = Field(5038, ge=1, le=65535)
    ami_user: str = ""
    ami_secret: str = ""

    @field_validator("dial_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if value.count("{number}") != 1 or re.search(r"\{(?!number\})", value):
            raise ValueError("must contain {number} exactly once, e.g. PJSIP/{number}@provider")
        if re.search(r"[\s,&\"\\]", value):
            raise ValueError("must not contain spaces, commas, '&', quotes or backslashes")
        return value

    @field_validator("phone_channel")
    @classmethod
    def _phone_channel(cls, value: str) -> str:
        return _inner_template(value)

    @field_validator("dial_options")
    @classmethod
    def _options(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9()^]*", value):
            raise ValueError("only Dial option letters are allowed, e.g. gT")
        return value


def _duration(value: object) -> object:
    """'90m', '2h', '45' (minutes) or '30s' -> seconds."""
    if isinstance(value, (int, float)):
        return float(value) * 60
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([hms]?)\s*", str(value).lower())
    if not match:
        raise ValueError("must be a duration such as 2h, 90m or 30s")
    number, unit = float(match.group(1)), match.group(2) or "m"
    return number * {"h": 3600, "m": 60, "s": 1}[unit]


def _hours(value: str) -> str:
    """'09:00-20:00' or empty (no calls)."""
    if value and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-4]):[0-5]\d", value):
        raise ValueError("must look like 09:00-20:00 (or be empty: no calls)")
    if value and value[:5] >= value[6:]:
        raise ValueError("the end must be later than the start")
    return value


class DialerSettings(DialerRules, _Section):
    group: str = "CallCenter"
    mode: Literal["client_first", "operator_first"] = "client_first"
    max_channels: int = Field(2, ge=1, le=500)
    max_attempts: int = Field(5, ge=1, le=100)
    retry_busy: float = 3600.0
    retry_noanswer: float = 2 * 3600.0
    retry_unreachable: float = 3 * 3600.0
    retry_ours: float = 300.0               # congestion, our own failures: not the client's attempt
    reassign_after: float = 1800.0
    ring_timeout: int = Field(30, ge=5, le=300)   # seconds the first party rings
    operator_channel: str = "PJSIP/{inner}"
    hours: str = "09:00-20:00"              # weekdays, in the client's local time
    hours_weekend: str = ""                 # empty: no calls on Saturday and Sunday
    default_timezone: str = "Europe/Moscow" # when the number does not tell one zone
    timezone: str = ""                      # times written for operators (task comments); empty: default_timezone
    dnc_file: str = ""
    dnc_field: str = ""                     # a CRM field of the client, e.g. UF_CRM_DNC (Y = do not call)
    use_timeman: bool = False
    hint_context: str = "default"           # where the operators' hints live (AMI ExtensionState)
    line_number: str = "autodialer"
    line_name: str = "Автообзвон"
    caller_prefix: str = "АВТО:"
    language: Literal["ru", "en"] = "ru"
    poll_interval: float = Field(30.0, ge=1, le=3600)

    @field_validator("retry_busy", "retry_noanswer", "retry_unreachable", "retry_ours", "reassign_after",
                     mode="before")
    @classmethod
    def _durations(cls, value: object) -> object:
        return _duration(value)

    @field_validator("use_timeman", mode="before")
    @classmethod
    def _flag(cls, value: object) -> object:
        return _yes_no(value)

    @field_validator("hours", "hours_weekend")
    @classmethod
    def _hours_field(cls, value: str) -> str:
        return _hours(value)

    @field_validator("operator_channel")
    @classmethod
    def _operator_channel(cls, value: str) -> str:
        return _inner_template(value)

    @field_validator("default_timezone", "timezone")
    @classmethod
    def _tz(cls, value: str, info: ValidationInfo) -> str:
        from zoneinfo import ZoneInfo

        if not value and info.field_name == "timezone":
            return value
        try:
            ZoneInfo(value)
        except Exception:
            raise ValueError("must be a time zone name such as Europe/Moscow")
        return value

    @field_validator("line_number")
    @classmethod
    def _line(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_\-+]{1,50}", value):
            raise ValueError("letters, digits, _ - + only, up to 50")
        return value


def _host_port(value: str, example: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port, e.g. {example}")
    return value


class EventsSettings(_Section):
    """Click-to-call and the website callback form: how Bitrix24's events reach agi-bitrix."""
    delivery: Literal["offline", "online"] = "offline"   # offline: the worker polls, no public URL needed
    handler_url: str = ""           # public https address of `agi-bitrix serve` (online delivery, install)
    listen: str = "127.0.0.1:8077"  # where `agi-bitrix serve` listens (behind your https proxy)
    click_dedup: float = Field(5.0, ge=0, le=120)  # seconds in which a second click on a number is a repeat
    callback_user: str = ""         # inner number rung for the website callback form (default: default_user)
    # The HTTP handler is open to the network: connections served at once (more are refused with
    # 503 at once) and seconds one connection may take in all.
    max_connections: int = Field(32, ge=1, le=1000)
    request_timeout: float = Field(10.0, gt=0, le=300)

    @field_validator("handler_url")
    @classmethod
    def _handler(cls, value: str) -> str:
        return checked_url(value) if value else value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _host_port(value, "127.0.0.1:8077")

    @field_validator("callback_user")
    @classmethod
    def _inner(cls, value: str) -> str:
        if value and not re.fullmatch(r"[0-9]{1,15}", value):
            raise ValueError("must be an inner (extension) number such as 101")
        return value


class ServiceSettings(_Section):
    """`agi-bitrix service`: FastAGI for the call steps, plus the long-lived jobs in one process."""
    fastagi: str = "127.0.0.1:4573"      # where the dialplan's AGI(agi://...) connects
    allow: str = "127.0.0.1, ::1"        # addresses that may connect to FastAGI (comma-separated)
    max_connections: int = Field(200, ge=1, le=5000)  # steps served at once (a `dial` holds one for the call)
    dialer: bool = False                 # also run the auto-dialer loop
    flush_interval: float = Field(5.0, gt=0, le=3600)  # seconds between outbox passes
    batch_window: float = Field(0.3, ge=0, le=5)  # seconds a register may wait to share a request

    @field_validator("fastagi")
    @classmethod
    def _fastagi(cls, value: str) -> str:
        return _host_port(value, "127.0.0.1:4573")

    @field_validator("allow")
    @classmethod
    def _allow(cls, value: str) -> str:
        import ipaddress

        for item in (part.strip() for part in value.split(",")):
            if item:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8)")
        return value

    @field_validator("dialer", mode="before")
    @classmethod
    def _flag(cls, value: object) -> object:
        return _yes_no(value)

    def allowed(self) -> list:
        return list(_networks(self.allow))  # asked at every FastAGI connection


@lru_cache(maxsize=16)
def _networks(allow: str) -> tuple:
    import ipaddress

    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in allow.split(",") if p.strip())


class PlacementsSettings(_Section):
    """The call-card widgets (the dialer's highlight and the agi-bitrix tab), served by `agi-bitrix serve`."""
    public_url: str = ""            # https address under which operators' browsers reach serve; empty: no widgets
    timeout: float = Field(2.0, gt=0, le=4)      # seconds a widget request may wait for the portal
    auth_cache: float = Field(60.0, ge=0, le=600)  # seconds a verified operator token is trusted again
    bx24_js: str = "https://api.bitrix24.com/api/v1/"  # the BX24 JS library the widget pages load

    @field_validator("public_url")
    @classmethod
    def _public(cls, value: str) -> str:
        return checked_url(value) if value else value

    @field_validator("bx24_js")
    @classmethod
    def _library(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s\"'<>]+", value):
            raise ValueError("must be the http(s) address of the BX24 JS library")
        return value


class Settings(SettingsRules, _Section):
    bitrix24: Bitrix24Settings = Bitrix24Settings()
    calls: CallsSettings = CallsSettings()
    storage: StorageSettings = StorageSettings()
    logging: LoggingSettings = LoggingSettings()
    asterisk: AsteriskSettings = AsteriskSettings()
    dialer: DialerSettings = DialerSettings()
    events: EventsSettings = EventsSettings()
    service: ServiceSettings = ServiceSettings()
    placements: PlacementsSettings = PlacementsSettings()
    path: str = ""


def load(explicit: Optional[str] = None, environ: Optional[Dict[str, str]] = None) -> Settings:
    """Load and validate settings; raise SettingsError with one line on any problem."""
    return validate(*settings_file.sources(explicit, environ))


def validate(path: Path, data: Sources) -> Settings:
    """Validate the values read from the sources; the result is also kept for the call steps."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise SettingsError(f"settings file {path}: unknown section [{unknown[0]}]")
    try:
        settings = Settings(**data, path=str(path))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        label = where.replace('.', '] ', 1) if "." in where else where + "]"  # a section's own check
        raise SettingsError(f"settings file {path}: [{label} {msg}")
    settings_file.remember(path, data, settings.model_dump())
    return settings
