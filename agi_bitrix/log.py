"""The file log: one JSON line per event, secrets redacted.

Many AGI processes append to the same file at once; each line goes out in a single write to an
O_APPEND file, so lines never interleave. When the file cannot be opened the line goes to stderr
(Asterisk's console), never to stdout, which belongs to the AGI protocol.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional, TextIO

import structlog

from agi_bitrix.ownership import match_owner

REDACTED = "***"
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}


class _Redactor:
    """A structlog processor that replaces every known secret inside any string value."""

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

    def __call__(self, logger: Any, name: str, event: dict) -> dict:
        return {k: (REDACTED if _secret_key(k) else self._clean(v)) for k, v in event.items()}


def _secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower() in {
        "auth", "access_token", "refresh_token", "client_secret", "secret", "ami_secret", "code",
        "application_token", "file_content",
    }


def _head(logger: Any, name: str, event: dict) -> dict:
    """Time with offset, level, event and linkedid first: what an administrator greps for."""
    head = {"time": datetime.now().astimezone().isoformat(timespec="milliseconds"), "level": name,
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


def configure(file: Optional[str], level: str = "INFO", secrets: Iterable[str] = ()) -> Any:
    """Set up structlog for this process and return a logger. Never raises."""
    stream: TextIO = sys.stderr
    problem = None
    if file:
        try:
            stream = _open(file)
        except OSError as exc:
            problem = f"cannot write log file {file}: {exc.strerror or exc}"
    structlog.configure(
        processors=[
            _head,
            _Redactor(secrets),
            structlog.processors.JSONRenderer(ensure_ascii=False, default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    logger = structlog.get_logger()
    if problem:
        logger.warning("log_file_unwritable", reason=problem)
    return logger
