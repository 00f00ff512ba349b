"""The file log: one JSON line per event, secrets redacted.

Many AGI processes append to the same file at once; each line goes out in a single write to an
O_APPEND file, so lines never interleave. When the file cannot be opened the line goes to stderr
(Asterisk's console), never to stdout, which belongs to the AGI protocol. Long-running commands
(worker, dialer, serve, service) reopen the file once logrotate has moved it away.

The logger is this small module rather than a logging library: a call step in process mode writes
one line, and importing structlog (it pulls in asyncio) cost that step about 100 ms of CPU.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional, TextIO

from agi_bitrix.ownership import match_owner

REDACTED = "***"
_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}


class _Redactor:
    """Replaces every known secret inside any string value of a log line."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: (REDACTED if _secret_key(k) else self._clean(v)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._clean(v) for v in value]
        return value

    def __call__(self, line: dict) -> dict:
        return self._clean(line)


def _secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower() in {
        "auth", "access_token", "refresh_token", "client_secret", "secret", "ami_secret", "code",
        "application_token", "file_content",
    }


def _head(level: str, event: dict) -> dict:
    """Time with offset, level, event and linkedid first: what an administrator greps for."""
    head = {"time": datetime.now().astimezone().isoformat(timespec="milliseconds"), "level": level,
            "event": event.pop("event", ""), "linkedid": event.pop("linkedid", None)}
    if head["linkedid"] is None:
        del head["linkedid"]
    head.update(event)
    return head


def _open(path: str) -> TextIO:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        match_owner(fd, Path(path).parent)  # a root command must not lock the Asterisk user out
    except OSError:
        pass
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


class LogFile:
    """The log file, reopened before a write when its path no longer names the open file (moved
    or removed by logrotate): the check of the standard library's WatchedFileHandler."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stream = _open(path)

    def _rotated(self) -> bool:
        try:
            now = os.stat(self.path)
        except OSError:
            return True
        held = os.fstat(self._stream.fileno())
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def write(self, text: str) -> int:
        if self._rotated():
            try:
                fresh = _open(self.path)
            except OSError:
                pass  # keep writing to the moved file rather than lose the line
            else:
                self._stream.close()
                self._stream = fresh
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()

    def fileno(self) -> int:
        return self._stream.fileno()


class Logger:
    """`logger.info("event", key=value, ...)`: one JSON line, written whole, under a lock (threads)."""

    def __init__(self, stream: TextIO, level: str, secrets: Iterable[str]) -> None:
        self.stream = stream
        self.level = _LEVELS.get(level, _LEVELS["INFO"])
        self.redact = _Redactor(secrets)
        self._lock = threading.Lock()

    def _emit(self, level: str, event: str, fields: dict) -> None:
        if _LEVELS[level.upper()] < self.level:
            return
        fields["event"] = event
        line = json.dumps(self.redact(_head(level, fields)), ensure_ascii=False, default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def reopen(self, file: Optional[str], level: str = "INFO", secrets: Iterable[str] = ()) -> None:
        """Point this logger at `file` again (after logrotate moved it) with new settings.

        Under the write lock, so a thread writing meanwhile never meets a closed file.
        """
        stream, problem = _stream(file)
        with self._lock:
            old, self.stream = self.stream, stream
            self.level = _LEVELS.get(level, _LEVELS["INFO"])
            self.redact = _Redactor(secrets)
        if old is not sys.stderr and old is not stream:
            try:
                old.close()
            except OSError:
                pass
        if problem:
            self.warning("log_file_unwritable", reason=problem)


def _stream(file: Optional[str]) -> "tuple[Any, Optional[str]]":
    if file:
        try:
            return LogFile(file), None
        except OSError as exc:
            return sys.stderr, f"cannot write log file {file}: {exc.strerror or exc}"
    return sys.stderr, None


def configure(file: Optional[str], level: str = "INFO", secrets: Iterable[str] = ()) -> Logger:
    """A logger writing to `file` (stderr when it cannot be opened). Never raises."""
    stream, problem = _stream(file)
    logger = Logger(stream, level, secrets)
    if problem:
        logger.warning("log_file_unwritable", reason=problem)
    return logger
