"""Several PBXs, one portal: the PostgreSQL store they share ([storage] url, pbx_id)."""
from __future__ import annotations

from conftest import pg_rows


def test_two_pbxs_keep_their_calls_apart_under_one_linkedid(two_pbxs, emulator):
    a, b = two_pbxs
    for pbx, ext in ((a, "102"), (b, "103")):
        assert pbx.run(["incoming", "89161234567"], linkedid="1795500000.1").set_variables["BITRIX_STATUS"] == "OK"
        pbx.run(["answer"], linkedid="1795500000.1", channel=f"PJSIP/{ext}-00000002")
        pbx.advance(3)
        assert pbx.run(["hangup", "ANSWER", "3"], linkedid="1795500000.1", dead=True).set_variables[
            "BITRIX_STATUS"] == "OK"
    rows = pg_rows(a.url, "SELECT pbx, linkedid, call_id, answered_inner, finished_at FROM agi_bitrix.calls"
                          " ORDER BY pbx")
    assert [(r["pbx"], r["linkedid"], r["answered_inner"]) for r in rows] == [
        ("office-a", "1795500000.1", "102"), ("office-b", "1795500000.1", "103")]
    assert all(r["finished_at"] for r in rows) and rows[0]["call_id"] != rows[1]["call_id"]
    assert len(emulator.calls) == 2 and all(c["finished"] for c in emulator.calls.values())
