"""PHP-style query strings, as Bitrix24 expects them inside `batch` commands."""
from __future__ import annotations

import re
from typing import Any, Iterator, Tuple
from urllib.parse import quote

# A whole value like `$result[u101][0][ID]`; anything looser (a caller ID that merely starts
# with "$result[") is encoded like any other value, so it cannot smuggle in parameters.
_REFERENCE = re.compile(r"\$result(\[[A-Za-z0-9_]+\])+")


def _pairs(prefix: str, value: Any) -> Iterator[Tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _pairs(f"{prefix}[{key}]" if prefix else str(key), item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _pairs(f"{prefix}[{index}]", item)
    elif isinstance(value, bool):
        yield prefix, "Y" if value else "N"
    elif value is None:
        yield prefix, ""
    else:
        yield prefix, str(value)


def build(params: dict) -> str:
    """`{"FILTER": {"UF_PHONE_INNER": "101"}}` -> `FILTER%5BUF_PHONE_INNER%5D=101`.

    `$result[...]` references must reach the server unencoded so batch can substitute them.
    """
    out = []
    for key, value in _pairs("", params):
        encoded = value if _REFERENCE.fullmatch(value) else quote(value, safe="")
        out.append(f"{quote(key, safe='[]')}={encoded}")
    return "&".join(out)
