"""What operators read in Bitrix24 (task comments, notifications, caller ID), Russian or English."""
from __future__ import annotations

from typing import Any

_TEXTS = {
    "ru": {
        "busy": "Автообзвон: клиент {client} ({phone}) занят.",
        "noanswer": "Автообзвон: клиент {client} ({phone}) не ответил.",
        "unreachable": "Автообзвон: номер клиента {client} ({phone}) недоступен или выключен.",
        "next": " Попытка {attempt} из {max}. Следующая попытка: {when}.",
        "final": " Попытка {attempt} из {max}: попытки исчерпаны, автообзвон по задаче остановлен.",
        "connected": "Автообзвон: разговор с клиентом {client} ({phone}), оператор {operator}, {duration} с.",
        "no_phone": "Автообзвон: у клиента задачи нет номера телефона, по которому можно позвонить.{bad}",
        "bad_numbers": " Отклонены номера: {numbers}.",
        "dnc": "Автообзвон: номер {phone} в списке «не звонить», задача не обзванивается.",
        "reassigned": "Автообзвон: ответственный {old} недоступен дольше {minutes} мин, задача передана оператору {new}.",
        "outside_group": "Автообзвон: ответственный не состоит в группе «{group}», задача передана оператору {new}.",
        "no_inner": "Автообзвон: у ответственного {operator} нет внутреннего номера, позвонить через него нельзя.",
        "notify": "[b]Автообзвон[/b]: клиент {client} ({phone}) на линии по задаче [URL={url}]{title}[/URL]",
        "caller": "{prefix}{client}",
    },
    "en": {
        "busy": "Auto-dialer: client {client} ({phone}) was busy.",
        "noanswer": "Auto-dialer: client {client} ({phone}) did not answer.",
        "unreachable": "Auto-dialer: the number of client {client} ({phone}) is unreachable or switched off.",
        "next": " Attempt {attempt} of {max}. Next attempt: {when}.",
        "final": " Attempt {attempt} of {max}: no attempts left, auto-dialing of this task stopped.",
        "connected": "Auto-dialer: talked to client {client} ({phone}), operator {operator}, {duration} s.",
        "no_phone": "Auto-dialer: the task's client has no phone number that can be dialed.{bad}",
        "bad_numbers": " Refused numbers: {numbers}.",
        "dnc": "Auto-dialer: {phone} is on the do-not-call list; this task is not dialed.",
        "reassigned": "Auto-dialer: the responsible {old} was unavailable for more than {minutes} min; the task "
                      "goes to operator {new}.",
        "outside_group": "Auto-dialer: the responsible is not a member of the group \"{group}\"; the task goes to "
                         "operator {new}.",
        "no_inner": "Auto-dialer: the responsible {operator} has no inner number; he cannot be connected.",
        "notify": "[b]Auto-dialer[/b]: client {client} ({phone}) is on the line for the task [URL={url}]{title}[/URL]",
        "caller": "{prefix}{client}",
    },
}


def text(language: str, key: str, **values: Any) -> str:
    return _TEXTS.get(language, _TEXTS["ru"])[key].format(**values)
