"""Connections to the shared PostgreSQL store, and its failures said in one line with the fix."""
from __future__ import annotations

import os
import socket
from typing import Any, Optional
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row

from agi_bitrix.store import StoreError

SCHEMA = "agi_bitrix"  # every table lives in this schema of the database the url names


class SharedStoreError(StoreError):
    """The shared store cannot be used; the message says what to fix."""


def where(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    return f"{host}:{parts.port or 5432}"


def friendly(exc: BaseException, url: str) -> str:
    """One line with the fix for what psycopg reported (never the password)."""
    parts = urlsplit(url)
    user = parts.username or os.environ.get("PGUSER") or "?"
    db = (parts.path or "/").lstrip("/") or user
    text = str(exc).strip()
    first = text.splitlines()[-1] if text else type(exc).__name__
    low = text.lower()
    at = f"PostgreSQL at {where(url)}"
    if "password authentication failed" in low or "no password supplied" in low:
        return (f"{at} refused the password of role {user}: correct the password in [storage] url "
                f"(or set it: ALTER ROLE {user} PASSWORD '...')")
    if "does not exist" in low and "database" in low:
        return f"{at} has no database {db}: create it (createdb -O {user} {db}) or correct [storage] url"
    if "role" in low and "does not exist" in low:
        return f"{at} has no role {user}: create it (CREATE ROLE {user} LOGIN PASSWORD '...') or correct [storage] url"
    if "connection refused" in low or "could not connect" in low or "timeout expired" in low:
        why = "connection refused" if "refused" in low else "no answer"
        return f"{at} cannot be reached ({why}): start PostgreSQL or correct the host and port in [storage] url"
    if "could not translate host name" in low or "name or service not known" in low:
        return f"{at}: no such host: correct the host in [storage] url"
    if "no pg_hba.conf entry" in low:
        return (f"{at} does not let this host in (pg_hba.conf): add a line for role {user} and database "
                f"{db}, then reload PostgreSQL")
    if "permission denied" in low:
        return (f"{at}: role {user} lacks rights ({first}): GRANT CREATE ON DATABASE {db} TO {user}, or run "
                f"agi-bitrix migrate once as the database's owner")
    if "statement timeout" in low or "canceling statement" in low:
        return f"{at} is too slow (a query outlived [storage] db_timeout): see its load and locks"
    return f"{at}: {first}"


def connect(url: str, pbx: str, timeout: float, autocommit: bool = True) -> Any:
    """A connection whose queries see the agi-bitrix schema; every statement is bounded by
    `timeout` so a sick server costs a call step its budget share, never more."""
    ms = max(100, int(timeout * 1000))
    try:
        return psycopg.connect(
            url, autocommit=autocommit, row_factory=dict_row,
            # libpq rounds connect_timeout below 2 s up to 2 s (PostgreSQL docs: libpq connect_timeout)
            connect_timeout=max(2, int(timeout + 0.999)),
            application_name=f"agi-bitrix {pbx}"[:63],
            options=f"-c search_path={SCHEMA} -c statement_timeout={ms} -c lock_timeout={ms}"
                    f" -c idle_in_transaction_session_timeout={max(ms * 10, 60000)}")
    except psycopg.Error as exc:
        raise SharedStoreError(friendly(exc, url)) from None


def identity(state_dir: str) -> str:
    """Who this PBX is, to tell two PBXs given the same pbx_id apart: its host and state folder."""
    return f"{socket.gethostname()}:{os.path.abspath(state_dir)}"


def errors() -> Any:
    return psycopg.Error


def is_down(exc: Optional[BaseException]) -> bool:
    """A failure of the server or the network (worth falling back on the local journal)."""
    return isinstance(exc, (psycopg.OperationalError, psycopg.errors.QueryCanceled, SharedStoreError))
