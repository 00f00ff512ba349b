"""`agi-bitrix install --agi-bin DIR [--settings PATH] [--owner USER]` (see the README).

Idempotent: a second run changes nothing. Needs root only to chown to the Asterisk user.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Tuple

from agi_bitrix import settings as settings_mod

DATA = Path(__file__).resolve().parent.parent / "data"


def _wrapper(settings_path: Path) -> str:
    # The interpreter of this installation, so the agi-bin script finds the installed package.
    return (f"#!{sys.executable}\n"
            "# Installed by `agi-bitrix install`: Asterisk runs this as AGI(agi-bitrix,EVENT,...).\n"
            "import os\n"
            "import sys\n\n"
            f"os.environ.setdefault({settings_mod.ENV_PATH_VAR!r}, {str(settings_path)!r})\n"
            "from agi_bitrix.cli import main\n\n"
            "sys.exit(main())\n")


def _owner(agi_bin: Path, name: Optional[str]) -> Optional[Tuple[int, int]]:
    if os.geteuid() != 0:
        return None  # not root: files belong to whoever runs this, nothing to hand over
    import pwd

    if name:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SystemExit(f"no such user {name!r}")
        return entry.pw_uid, entry.pw_gid
    st = agi_bin.stat()
    return st.st_uid, st.st_gid


def _chown(path: Path, owner: Optional[Tuple[int, int]]) -> None:
    if owner is not None:
        os.chown(path, *owner)


def _write_if_changed(path: Path, text: str, mode: int) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        if (path.stat().st_mode & 0o777) != mode:
            path.chmod(mode)
            return True
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    os.replace(tmp, path)
    return True


def _migrate(settings: object, owner: Optional[Tuple[int, int]]) -> list:
    """The schema migrations (commands/migrate.py), the state database handed to the Asterisk user."""
    from agi_bitrix.commands.migrate import migrate
    from agi_bitrix.store import StoreError

    try:
        lines = migrate(settings, quiet=True)
    except StoreError as exc:
        raise SystemExit(f"{exc} (then run agi-bitrix migrate)")
    state_dir = Path(getattr(settings, "storage").state_dir)
    for path in state_dir.glob("agi-bitrix.sqlite3*"):
        _chown(path, owner)
    return lines


def run(args: object) -> int:
    agi_bin = Path(getattr(args, "agi_bin")).resolve()
    settings_path = settings_mod.settings_path(getattr(args, "settings", None)).resolve()
    try:
        if not agi_bin.is_dir():
            raise SystemExit(f"{agi_bin} is not a folder (Asterisk's astagidir, see asterisk.conf)")
        owner = _owner(agi_bin, getattr(args, "owner", None))
        changes = []
        script = agi_bin / "agi-bitrix"
        if _write_if_changed(script, _wrapper(settings_path), 0o755):
            changes.append(f"wrote {script}")
        _chown(script, owner)
        if not settings_path.exists():
            settings_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(DATA / "settings.ini.sample", settings_path)
            settings_path.chmod(0o600)
            changes.append(f"created {settings_path} (fill in [bitrix24] and [calls])")
        _chown(settings_path, owner)
        record = settings_mod.record_file()
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            if _write_if_changed(record, f"{settings_path}\n", 0o644):
                changes.append(f"recorded {settings_path} in {record}: every agi-bitrix command uses it")
        except OSError as exc:
            print(f"note: cannot record the settings path in {record} ({exc.strerror}); give the other "
                  f"commands and units {settings_mod.ENV_PATH_VAR}={settings_path}", file=sys.stderr)
        try:
            settings = settings_mod.load(str(settings_path))
            folders = [Path(settings.storage.state_dir), Path(settings.logging.file).parent]
        except settings_mod.SettingsError as exc:
            print(f"note: {exc}; folders not created", file=sys.stderr)
            folders = []
        for folder in folders:
            if not folder.is_dir():
                folder.mkdir(parents=True, mode=0o750)
                changes.append(f"created {folder}")
            _chown(folder, owner)
        if folders:
            changes += _migrate(settings, owner)
    except SystemExit as exc:
        print(f"agi-bitrix install: {exc.code}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"agi-bitrix install: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    for line in changes or ["nothing to change: already installed"]:
        print(line)
    print("next: edit the settings, then run `agi-bitrix check`")
    return 0
