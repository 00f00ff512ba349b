"""Whether the user Asterisk runs as may read, enter or run a file: decided from the file modes,
since `check` usually runs as root, for whom everything is allowed."""
from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, Optional


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gids: FrozenSet[int]


def _user(uid: int) -> User:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return User(str(uid), uid, frozenset())
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}
    return User(entry.pw_name, uid, frozenset(groups))


def current_user() -> User:
    return _user(os.geteuid())


def owner_of(path: Path) -> Optional[User]:
    try:
        return _user(path.stat().st_uid)
    except OSError:
        return None


def asterisk_user(agi_bin: Path) -> Optional[User]:
    """Asterisk runs the AGI script as its own user, which `install` made the script's owner
    (else the owner of agi-bin itself)."""
    return owner_of(agi_bin / "agi-bitrix") or owner_of(agi_bin)


def allows(path: Path, user: User, mode: int) -> bool:
    """May `user` do `mode` (os.R_OK | os.W_OK | os.X_OK) to `path`? Root only needs an x bit to run."""
    from agi_bitrix.ownership import permits

    try:
        st = path.stat()
    except OSError:
        return False
    if user.uid == 0:
        return not (mode & os.X_OK) or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
    return permits(st, user.uid, user.gids, mode)


def first_unenterable(folder: Path, user: User) -> Optional[Path]:
    """The first folder on the way from / to `folder` the user may not enter, or None."""
    folder = folder.absolute()
    for step in reversed([folder, *folder.parents]):
        if step.is_dir() and not allows(step, user, os.X_OK):
            return step
    return None
