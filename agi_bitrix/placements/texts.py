"""What the call-card widgets say, in Russian or English by the Bitrix24 user's language (the LANG
the portal puts in the frame's address, Bitrix24 REST docs: widgets/_includes/widget_data.md)."""
from __future__ import annotations

import re
from typing import Any, Dict

_RUSSIAN = {"ru", "by", "kz"}

TEXTS: Dict[str, Dict[str, str]] = {
    "ru": {
        "card_title": "АВТООБЗВОН · Задача #{task} «{title}»",
        "card_status": "попытка {n} из {max} · у клиента {time}",
        "tab_title": "Клиент и задача",
        "dialer": "Звонок автообзвона",
        "task": "Задача",
        "deadline": "Крайний срок",
        "responsible": "Ответственный оператор",
        "client": "Клиент",
        "client_time": "Время у клиента",
        "attempt": "Попытка",
        "attempt_of": "{n} из {max}",
        "attempts": "Попытки",
        "when": "Когда",
        "outcome": "Итог",
        "operator": "Оператор",
        "ordinary": "Обычный звонок",
        "manager": "Ответственный менеджер клиента",
        "manager_unknown": "не известен",
        "manager_later": "сейчас не удалось узнать (портал не ответил вовремя)",
        "last_calls": "Последние звонки клиента",
        "no_calls": "Других звонков с этим номером нет",
        "direction": "Направление",
        "result": "Результат",
        "duration": "Длительность",
        "employee": "Сотрудник",
        "incoming": "входящий",
        "outgoing": "исходящий",
        "unknown_call": "По этому звонку у agi-bitrix нет сведений для вас.",
        "unavailable": "Сведения сейчас недоступны: Bitrix24 не ответил вовремя. Откройте вкладку ещё раз позже.",
        "refused": "Доступ не подтверждён.",
        "sec": "{s} с",
        "busy": "занято", "noanswer": "не ответил", "unreachable": "недоступен", "congestion": "перегрузка линии",
        "failed": "сбой", "connected": "разговор", "nooperator": "оператор не ответил", "live": "идёт сейчас",
        "status_200": "разговор", "status_304": "не отвечен", "status_486": "занято", "status_480": "недоступен",
        "status_603-S": "отменён", "status_503": "перегрузка", "status_": "идёт",
    },
    "en": {
        "card_title": "AUTO-DIALER · Task #{task} “{title}”",
        "card_status": "attempt {n} of {max} · client's time {time}",
        "tab_title": "Client and task",
        "dialer": "Auto-dialer call",
        "task": "Task",
        "deadline": "Deadline",
        "responsible": "Responsible operator",
        "client": "Client",
        "client_time": "Client's local time",
        "attempt": "Attempt",
        "attempt_of": "{n} of {max}",
        "attempts": "Attempts",
        "when": "When",
        "outcome": "Outcome",
        "operator": "Operator",
        "ordinary": "Ordinary call",
        "manager": "Client's responsible manager",
        "manager_unknown": "not known",
        "manager_later": "could not be asked now (the portal did not answer in time)",
        "last_calls": "The client's last calls",
        "no_calls": "No other calls with this number",
        "direction": "Direction",
        "result": "Result",
        "duration": "Duration",
        "employee": "Employee",
        "incoming": "incoming",
        "outgoing": "outgoing",
        "unknown_call": "agi-bitrix has nothing to show you about this call.",
        "unavailable": "Not available right now: Bitrix24 did not answer in time. Open the tab again later.",
        "refused": "Access not confirmed.",
        "sec": "{s} s",
        "busy": "busy", "noanswer": "no answer", "unreachable": "unreachable", "congestion": "congestion",
        "failed": "failed", "connected": "talked", "nooperator": "operator did not answer", "live": "going on now",
        "status_200": "talked", "status_304": "not answered", "status_486": "busy", "status_480": "unreachable",
        "status_603-S": "cancelled", "status_503": "congestion", "status_": "going on",
    },
}


def language(lang: Any) -> str:
    return "ru" if str(lang or "").strip().lower()[:2] in _RUSSIAN else "en"


def words(lang: str) -> Dict[str, str]:
    return TEXTS[language(lang)]


def plain(value: Any, limit: int = 80) -> str:
    """A CRM or task text made safe for the card's title line, whose rendering we do not control:
    no control characters, no angle brackets, bounded length."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(value or "")).replace("<", "‹").replace(">", "›").strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"
