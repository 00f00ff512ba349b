"""Files the integration writes belong to the user Asterisk runs as, whoever made them.

Administrators run commands as root (`check`, `outbox flush`, `auth`, a worker started by hand).
A database, journal, token or log file made by root would lock out every later call step run
by Asterisk, so each such file is handed to the owner of its folder (`install` gives the state
and log folders to the Asterisk user).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Union

Target = Union[int, str, Path]  # an open file descriptor or a path


def match_owner(target: Target, folder: Path) -> None:
    """Give `target` the owner and group of `folder` (only root can, and only root needs to)."""
    if os.geteuid() != 0:
        return
    st = os.stat(folder)
    mine = os.stat(target)
    if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
        os.chown(target, st.st_uid, st.st_gid)


def match_owner_quietly(paths: Iterable[Path], folder: Path) -> None:
    """match_owner for files that may or may not exist (SQLite's -wal and -shm)."""
    for path in paths:
        try:
            match_owner(path, folder)
        except OSError:
            pass  # gone meanwhile (the last connection removed it), or not ours to change


def open_private(path: Path) -> int:
    """Open (create) a state file readable by its owner only, owned like its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    match_owner(fd, path.parent)
    return fd


def permits(st: os.stat_result, uid: int, groups: Iterable[int], mode: int) -> bool:
    """The classic owner / group / other check of `mode` (os.R_OK | os.W_OK | os.X_OK) for a user
    other than root, decided from the file's mode bits (whoever runs the check)."""
    shift = 6 if st.st_uid == uid else 3 if st.st_gid in set(groups) else 0
    return ((st.st_mode >> shift) & mode) == mode


def unwritable_by(paths: Iterable[Path], uid: int, groups: Iterable[int]) -> List[Path]:
    """The files among `paths` that user `uid` (member of `groups`) cannot write."""
    if uid == 0:
        return []
    member = set(groups)
    bad = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not permits(st, uid, member, os.W_OK):
            bad.append(Path(path))
    return bad
