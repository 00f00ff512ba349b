"""The sample dialplan read as Asterisk reads it: what it dials, what it never captures or answers."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

SAMPLE = Path(__file__).resolve().parent.parent / "extensions.conf.sample"


def contexts() -> Dict[str, List[str]]:
    """context -> its `exten =>` / `same =>` lines (comments dropped)."""
    out: Dict[str, List[str]] = {}
    current = None
    for raw in SAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.split(";", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            out[current] = []
        elif line and current:
            out[current].append(line)
    return out


def pattern_regex(pattern: str) -> re.Pattern:
    """An extension pattern as pbx.c matches it: X N Z, [classes], '.' one or more, '!' zero or more."""
    if not pattern.startswith("_"):
        return re.compile(re.escape(pattern))
    out, i = "", 1
    while i < len(pattern):
        ch = pattern[i]
        if ch == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1:end] + "]"
            i = end + 1
            continue
        out += {"X": "[0-9]", "Z": "[1-9]", "N": "[2-9]", ".": ".+", "!": ".*"}.get(ch.upper(), re.escape(ch))
        i += 1
    return re.compile(out)


def patterns(context: str) -> List[str]:
    return [m.group(1) for line in contexts()[context] if (m := re.match(r"exten\s*=>\s*([^,]+),1,", line))]


def test_outbound_context_never_captures_an_extension():
    found = [pattern_regex(p) for p in patterns("bitrix-outbound")]
    assert found
    for ext in ("1", "101", "1234", "55555", "999999"):
        assert not any(r.fullmatch(ext) for r in found), ext
    assert any(r.fullmatch("84951234567") for r in found)


def test_refused_star9_number_never_answers_the_channel():
    lines = contexts()["bitrix-outbound"]
    start = next(i for i, line in enumerate(lines) if "(refused)" in line)
    branch = []
    for line in lines[start:]:
        if line.startswith("exten"):
            break
        branch.append(line)
    assert branch and "Hangup(" in branch[-1]
    assert not any("Answer(" in line for line in branch)
    assert all("noanswer" in line for line in branch if "Playback(" in line)
    assert any("Progress()" in line for line in branch)


def test_responsible_manager_may_transfer_and_transfers_dial_what_the_step_says():
    dials = [line for line in contexts()["bitrix-inbound"] if "Dial(" in line]
    assert dials and all(re.search(r",[A-Za-z]*t[A-Za-z]*U\(bitrix-answer\)\)", d) for d in dials)
    transfer = contexts()["bitrix-transfer"]
    assert any("Dial(${BITRIX_DIAL}," in line for line in transfer)
    assert not any("PHONE_PREFIX" in line for line in transfer)  # not every target is a phone
