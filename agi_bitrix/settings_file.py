"""Where the settings come from, and the validated settings kept for the call steps.

settings.py validates the settings with pydantic. Importing it and building the models'
validators costs a process-mode call step about 100 ms of CPU, four times everything else it
does, on every call. So every validation also leaves its result in `state_dir/settings-cache.json`
with the sources it was made from (the settings file's values, the .env beside it, the
AGI_BITRIX_* environment) and a fingerprint of the models. A call step reads the sources (cheap)
and, when they are exactly the ones cached, takes the cached result instead of validating
again; any other source, model or version validates as before and caches anew. Nothing here
validates: a value reaches a step only as pydantic left it.
"""
from __future__ import annotations

import configparser
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from agi_bitrix import __version__

DEFAULT_PATH = "/etc/agi-bitrix/settings.ini"
DEFAULT_STATE_DIR = "/var/lib/agi-bitrix"
ENV_PATH_VAR = "AGI_BITRIX_SETTINGS"
ENV_PREFIX = "AGI_BITRIX_"
SECTIONS = ("bitrix24", "calls", "storage", "logging", "asterisk", "dialer", "events", "service", "placements")
OAUTH_KEYS = ("portal_url", "client_id", "client_secret")
CACHE_FILE = "settings-cache.json"

Sources = Dict[str, Dict[str, str]]  # section -> key -> value as written


class SettingsError(Exception):
    """A settings problem, phrased for the administrator in one line."""


# -- the sources --------------------------------------------------------------------------------
def record_file() -> Path:
    """Where `agi-bitrix install --settings PATH` records PATH for this installation (its Python
    prefix: the virtualenv, or the system prefix), so every command and unit finds it."""
    return Path(sys.prefix) / "etc" / "agi-bitrix" / "settings-path"


def recorded_path() -> Optional[str]:
    try:
        text = record_file().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.startswith("/") and "\n" not in text else None


def settings_path(explicit: Optional[str] = None) -> Path:
    """--settings, else AGI_BITRIX_SETTINGS, else what install recorded, else the default."""
    return Path(explicit or os.environ.get(ENV_PATH_VAR) or recorded_path() or DEFAULT_PATH)


def _read_ini(path: Path) -> Sources:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        # utf-8-sig: Windows editors save a byte-order mark that configparser would take for text.
        with path.open(encoding="utf-8-sig") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} not found (run: agi-bitrix install, or set {ENV_PATH_VAR})")
    except PermissionError:
        user = _user_name()
        raise SettingsError(f"settings file {path} is not readable by the user {user} (as root: "
                            f"chown {user} {path}; chmod 600 {path}; and let {user} enter its folder)")
    except UnicodeDecodeError:
        raise SettingsError(f"settings file {path} is not UTF-8 text")
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise SettingsError(f"settings file {path} is broken: {first}")
    return {name: dict(parser.items(name)) for name in parser.sections()}


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _overrides(env: Mapping[str, Optional[str]]) -> Sources:
    result: Sources = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PATH_VAR or value is None:
            continue
        rest = key[len(ENV_PREFIX):].lower()
        for section in SECTIONS:
            if rest.startswith(section + "_"):
                result.setdefault(section, {})[rest[len(section) + 1:]] = value
                break
    return result


def sources(explicit: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Tuple[Path, Sources]:
    """The settings file's path and every value as written, precedence applied (highest first:
    process environment, .env beside the settings file, settings.ini); SettingsError when the file
    cannot be read."""
    path = settings_path(explicit)
    data = _read_ini(path)
    env_sources: Dict[str, str] = {}
    dotenv_file = path.parent / ".env"
    if dotenv_file.is_file():
        from dotenv import dotenv_values

        env_sources.update({k: v for k, v in dotenv_values(dotenv_file).items() if v is not None})
    env_sources.update(os.environ if environ is None else environ)
    for section, keys in _overrides(env_sources).items():
        data.setdefault(section, {}).update(keys)
    return path, data


# -- what the settings tell beyond their values (the pydantic models and the cached form alike) ---
class Bitrix24Rules:
    @property
    def mode(self) -> str:
        """webhook, oauth or none."""
        if self.webhook_url:  # type: ignore[attr-defined]
            return "webhook"
        if all(getattr(self, key) for key in OAUTH_KEYS):
            return "oauth"
        return "none"


class StorageRules:
    @property
    def shared(self) -> bool:
        """The state lives in the PostgreSQL store several PBXs share."""
        return bool(self.url)  # type: ignore[attr-defined]


class DialerRules:
    @property
    def operator_timezone(self) -> str:
        """The zone of the times operators read in task comments (named in the text)."""
        return self.timezone or self.default_timezone  # type: ignore[attr-defined]


class SettingsRules:
    def secrets(self) -> List[str]:
        """Values that must never reach a log line."""
        b24, ami, storage = self.bitrix24, self.asterisk, self.storage  # type: ignore[attr-defined]
        found = [b24.client_secret, ami.ami_secret, urlsplit(storage.url).password or ""]
        if b24.webhook_url:
            # https://portal/rest/<user>/<code>/ : the code is the secret.
            parts = [p for p in urlsplit(b24.webhook_url).path.split("/") if p]
            if len(parts) >= 3:
                found.append(parts[2])
        return [s for s in found if s and len(s) >= 4]


class _Section:
    """One section as validated, read back: the same attributes, names and types as the model's."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.__dict__.update(values)


class _Bitrix24(Bitrix24Rules, _Section):
    pass


class _Dialer(DialerRules, _Section):
    pass


class _Storage(StorageRules, _Section):
    pass


class CachedSettings(SettingsRules):
    """The settings a validation left in the cache, for a call step."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        kinds = {"bitrix24": _Bitrix24, "dialer": _Dialer, "storage": _Storage}
        for name, value in values.items():
            setattr(self, name, kinds.get(name, _Section)(value) if isinstance(value, dict) else value)


# -- the cache ----------------------------------------------------------------------------------
def load_for_step(explicit: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Any:
    """The settings for a call step: from the cache when its sources are exactly these, else
    validated (and cached) by settings.py. SettingsError, in one line, for any problem."""
    path, data = sources(explicit, environ)
    key, cache = _key(path, data), _cache_path(data)
    values = _read_cache(cache, key) if key is not None and cache is not None else None
    if values is not None:
        return CachedSettings(values)
    from agi_bitrix import settings

    return settings.validate(path, data)


def remember(path: Path, data: Sources, values: Dict[str, Any]) -> None:
    """Keep a validation's result for the call steps (a no-op when it is kept already or the state
    folder is not there or not writable: the steps then validate themselves)."""
    key, cache = _key(path, data), _cache_path(data)
    if key is None or cache is None or not cache.parent.is_dir():
        return
    try:
        body = json.dumps({"key": key, "settings": values}, ensure_ascii=False, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError):
        return  # a value JSON cannot hold would not read back the same: no cache
    from agi_bitrix.ownership import match_owner

    try:
        if cache.read_bytes() == body:
            match_owner(cache, cache.parent)  # kept by root before the folder was given away
            return
    except OSError:
        pass
    temp = cache.with_name(f".{CACHE_FILE}.{os.getpid()}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            match_owner(fd, cache.parent)  # made by root: the Asterisk user's steps read it
        finally:
            os.close(fd)
        os.replace(temp, cache)
    except OSError:
        try:
            temp.unlink()
        except OSError:
            pass


def _key(path: Path, data: Sources) -> Optional[Dict[str, Any]]:
    """What a cached result holds for: these sources, this settings file, these models."""
    try:
        models = zlib.crc32(Path(__file__).with_name("settings.py").read_bytes())
    except OSError:
        return None
    return {"version": __version__, "models": models, "path": str(path), "sources": data}


def _cache_path(data: Sources) -> Optional[Path]:
    state_dir = str(data.get("storage", {}).get("state_dir", DEFAULT_STATE_DIR)).strip()
    return Path(state_dir) / CACHE_FILE if state_dir else None


def _read_cache(cache: Path, key: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The cached settings when they hold for `key`; None otherwise. A file someone other than
    this user (or root) could have written is not trusted."""
    try:
        fd = os.open(cache, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
            return None
        raw = fh.read()
    try:
        cached = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(cached, dict) or cached.get("key") != key or not isinstance(cached.get("settings"), dict):
        return None
    return cached["settings"]
