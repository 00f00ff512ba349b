"""PHP-style query strings, as Bitrix24 expects them inside `batch` commands."""
from __future__ import annotations

import re
import urllib.parse
from typing import Any, Dict, Iterable, Iterator, Tuple
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


# Reading PHP-style keys: what Bitrix24 POSTs to event handlers (`data[CALL_ID]=...`, `auth[...]`).
_PHP_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
# Bounds in the spirit of PHP's max_input_vars (1000) and max_input_nesting_level (64): an event
# of Bitrix24 has a few dozen keys nested three deep, so anything far beyond is not one.
MAX_KEYS = 1000
MAX_DEPTH = 32


class FormTooComplex(ValueError):
    """A form with more keys or deeper nesting than the bounds: refused, never half parsed."""


def parse_php_pairs(pairs: Iterable[Tuple[str, str]], max_keys: int = MAX_KEYS,
                    max_depth: int = MAX_DEPTH) -> Dict[str, Any]:
    """Build nested params from PHP-style keys: ``a[b][]=1`` -> ``{"a": {"b": ["1"]}}``.

    Containers whose keys are exactly 0..n-1 in order become lists, as PHP's json_encode does.
    Raises FormTooComplex beyond ``max_keys`` pairs or ``max_depth`` levels of brackets.
    """
    root: Dict[str, Any] = {}
    for count, (key, value) in enumerate(pairs, 1):
        if count > max_keys:
            raise FormTooComplex(f"more than {max_keys} keys")
        m = _PHP_KEY.match(key)
        if not m:
            if key:
                root[key] = value
            continue
        path = [m.group(1)] + _BRACKETS.findall(m.group(2))
        if len(path) > max_depth:
            raise FormTooComplex(f"keys nested deeper than {max_depth} levels")
        node = root
        for i, seg in enumerate(path):
            if seg == "":
                seg = str(_next_index(node))
            if i == len(path) - 1:
                node[seg] = value
            else:
                child = node.get(seg)
                if not isinstance(child, dict):
                    child = {}
                    node[seg] = child
                node = child
    return {k: _listify(v) for k, v in root.items()}


def parse_php_query(query: str, max_keys: int = MAX_KEYS, max_depth: int = MAX_DEPTH) -> Dict[str, Any]:
    """Parse a query string / form body with PHP-style nested keys (bounded, see parse_php_pairs)."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, max_num_fields=max_keys)
    except ValueError:  # parse_qsl's own field limit, counted before any key is looked at
        raise FormTooComplex(f"more than {max_keys} keys") from None
    return parse_php_pairs(pairs, max_keys, max_depth)


def _next_index(node: dict) -> int:
    ints = [int(k) for k in node if re.fullmatch(r"-?\d+", k)]
    return max(ints) + 1 if ints else 0


def _listify(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    out = {k: _listify(v) for k, v in value.items()}
    if out and list(out) == [str(i) for i in range(len(out))]:
        return list(out.values())
    return out


