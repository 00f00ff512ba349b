"""What the dialer reads from Bitrix24: the group, its operators, the due tasks, their clients.

Reads are batched and paginated (target: at most 10 REST requests per 100 due tasks). Requests
use UPPER_CASE field names; `tasks.task.*` answers in camelCase (Bitrix24 REST docs:
tasks.task.list).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Optional, Tuple

from agi_bitrix.bitrix.client import BATCH_MAX, Bitrix24
from agi_bitrix.bitrix.errors import NotFoundError

PAGE = 50
OPEN_STATUSES_EXCLUDED = [4, 5, 6, 7]  # awaiting control, completed, deferred, declined
_PREFIXES = {"C": "CONTACT", "CO": "COMPANY", "L": "LEAD"}
_GET = {"CONTACT": "crm.contact.get", "COMPANY": "crm.company.get", "LEAD": "crm.lead.get"}


@dataclass
class Operator:
    user_id: int
    name: str
    inner: Optional[str]
    online: bool
    last_activity: str = ""        # as the portal writes it (portal format, not ISO)
    workday: Optional[str] = None  # timeman status when asked for


@dataclass
class Client:
    entity_type: str
    entity_id: int
    name: str = ""
    phones: List[str] = field(default_factory=list)
    fields: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DueTask:
    id: int
    title: str
    responsible_id: int
    deadline: str
    bindings: List[Tuple[str, int]]
    clients: List[Client] = field(default_factory=list)


def parse_binding(value: str) -> Optional[Tuple[str, int]]:
    """`C_12` -> (CONTACT, 12); parse on the last underscore (`C_` vs `CO_`); others -> None."""
    prefix, sep, ident = str(value).rpartition("_")
    if not sep or prefix not in _PREFIXES or not ident.isdigit():
        return None
    return _PREFIXES[prefix], int(ident)


def _pages(client: Bitrix24, method: str, params: Dict[str, Any], rows_of: Any) -> List[Any]:
    """All pages of a list method: the first page tells `total`, the rest go in batches."""
    first = client.call_raw(method, dict(params, start=0))
    rows = list(rows_of(first.get("result")))
    total = int(first.get("total") or 0)
    starts = list(range(PAGE, total, PAGE))
    for chunk in range(0, len(starts), BATCH_MAX):
        commands = {f"p{s}": (method, dict(params, start=s)) for s in starts[chunk:chunk + BATCH_MAX]}
        result = client.batch(commands)
        for key in commands:
            err = result.error(key)
            if err:
                raise err
            rows.extend(rows_of(result.results.get(key)))
    return rows


class Portal:
    def __init__(self, client: Bitrix24) -> None:
        self.client = client

    def group_id(self, name: str) -> int:
        rows = self.client.call("sonet_group.get", {"FILTER": {"NAME": name}, "IS_ADMIN": "Y"}) or []
        exact = [r for r in rows if isinstance(r, dict) and r.get("NAME") == name]
        if not exact:
            raise NotFoundError("GROUP_NOT_FOUND", f"no workgroup named {name!r} (set [dialer] group)", None,
                                "sonet_group.get")
        return int(exact[0]["ID"])

    def operators(self, group_id: int, with_workday: bool = False) -> Dict[int, Operator]:
        members = self.client.call("sonet_group.user.get", {"ID": group_id}) or []
        ids = sorted({int(m["USER_ID"]) for m in members if isinstance(m, dict) and str(m.get("USER_ID", "")).isdigit()})
        if not ids:
            return {}
        commands = {f"u{i}": ("user.get", {"FILTER": {"@ID": ids[i:i + PAGE], "ACTIVE": "true"}})
                    for i in range(0, len(ids), PAGE)}
        if with_workday:
            for uid in ids[:BATCH_MAX - len(commands)]:
                commands[f"t{uid}"] = ("timeman.status", {"USER_ID": uid})
        result = self.client.batch(commands)
        found: Dict[int, Operator] = {}
        for key, rows in result.results.items():
            if not key.startswith("u") or not isinstance(rows, list):
                continue
            for row in rows:
                inner = str(row.get("UF_PHONE_INNER") or "").strip() or None
                name = " ".join(p for p in (row.get("NAME"), row.get("LAST_NAME")) if p) or f"#{row.get('ID')}"
                last = row.get("LAST_ACTIVITY_DATE")
                found[int(row["ID"])] = Operator(int(row["ID"]), name, inner, row.get("IS_ONLINE") == "Y",
                                                 last if isinstance(last, str) else "")
        for uid, op in found.items():
            status = result.results.get(f"t{uid}")
            if isinstance(status, dict):
                op.workday = status.get("STATUS")
        return found

    def due_tasks(self, group_id: int, now: datetime) -> List[DueTask]:
        params = {
            "filter": {"GROUP_ID": group_id, "!REAL_STATUS": OPEN_STATUSES_EXCLUDED,
                       "<=DEADLINE": now.isoformat(timespec="seconds")},
            "select": ["ID", "TITLE", "RESPONSIBLE_ID", "DEADLINE", "STATUS", "UF_CRM_TASK"],
            "order": {"DEADLINE": "asc", "ID": "asc"},
        }
        rows = _pages(self.client, "tasks.task.list", params,
                      lambda result: (result or {}).get("tasks", []) if isinstance(result, dict) else [])
        tasks = []
        for row in rows:
            bindings = [b for b in (parse_binding(v) for v in (row.get("ufCrmTask") or [])) if b]
            tasks.append(DueTask(int(row["id"]), str(row.get("title") or ""), int(row.get("responsibleId") or 0),
                                 str(row.get("deadline") or ""), bindings))
        return tasks

    def fill_clients(self, tasks: List[DueTask]) -> None:
        """The bound CRM items with their phones, read in batches of 50."""
        wanted = sorted({b for t in tasks for b in t.bindings})
        items: Dict[Tuple[str, int], Client] = {}
        for chunk in range(0, len(wanted), BATCH_MAX):
            part = wanted[chunk:chunk + BATCH_MAX]
            commands = {f"{kind[:2]}{ident}": (_GET[kind], {"id": ident}) for kind, ident in part}
            result = self.client.batch(commands)
            for (kind, ident), key in zip(part, commands):
                row = result.results.get(key)
                if not isinstance(row, dict):
                    continue  # deleted or not visible: the task gets no phone from it
                name = row.get("TITLE") if kind == "COMPANY" else " ".join(
                    p for p in (row.get("NAME"), row.get("LAST_NAME")) if p) or row.get("TITLE")
                numbers = [str(p.get("VALUE") or "") for p in (row.get("PHONE") or []) if isinstance(p, dict)]
                items[(kind, ident)] = Client(kind, ident, str(name or f"{kind} #{ident}"), numbers, row)
        for task in tasks:
            task.clients = [items[b] for b in task.bindings if b in items]
