"""What administrators read (check, outbox status, dialer status, command errors), English or Russian.

The texts are written in English in the code; `RU` below is the whole Russian catalogue, keyed by
the English template. `Texts.translate` also turns an already formatted English message (an
exception's text) into Russian by matching it against the templates, so errors raised deep in
the code need no language of their own.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Dict, Mapping, Optional, Pattern, Tuple

LANGUAGES = ("en", "ru")


def choose_language(explicit: Optional[str] = None, setting: Optional[str] = None,
                    environ: Optional[Mapping[str, str]] = None) -> str:
    """--lang, then [logging] language, then the locale as POSIX orders it: LC_ALL, LC_MESSAGES, LANG."""
    for value in (explicit, setting):
        if value in LANGUAGES:
            return value  # type: ignore[return-value]
    env = os.environ if environ is None else environ
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = env.get(name) or ""
        if value:
            return "ru" if value.lower().startswith("ru") else "en"
    return "en"


class Texts:
    def __init__(self, language: str = "en") -> None:
        self.language = language if language in LANGUAGES else "en"

    def __call__(self, template: str, **values: object) -> str:
        if self.language == "ru":
            template = RU.get(template, template)
        return template.format(**values)

    def translate(self, message: str) -> str:
        """An English message built from a known template, in this language (else unchanged)."""
        if self.language == "en" or not message:
            return message
        if message in RU:
            return RU[message]
        for template, pattern in _patterns():
            match = pattern.fullmatch(message)
            if match:
                return RU[template].format(**{k: self.translate(v) for k, v in match.groupdict().items()})
        return message


@lru_cache(maxsize=1)
def _patterns() -> Tuple[Tuple[str, Pattern[str]], ...]:
    out = []
    for template in RU:
        if RU[template] == template:
            continue  # the same in both languages (a bare "{reason}" would match anything)
        parts = re.split(r"\{(\w+)\}", template)
        regex, seen = "", set()
        for i, part in enumerate(parts):
            if i % 2 == 0:
                regex += re.escape(part)
            else:  # a placeholder used twice must match the same text twice
                regex += f"(?P={part})" if part in seen else f"(?P<{part}>.+?)"
                seen.add(part)
        if seen:
            out.append((template, re.compile(regex, re.S)))
    # The longest literal text first: a specific template wins over a general one.
    out.sort(key=lambda tp: -len(re.sub(r"\{\w+\}", "", tp[0])))
    return tuple(out)


RU: Dict[str, str] = {
    # -- check: the report's frame
    "OK": "ОК",
    "WARNING": "ВНИМАНИЕ",
    "PROBLEM": "ПРОБЛЕМА",
    "all good": "всё в порядке",
    "{reason}": "{reason}",
    "agi-bitrix check: {count} problem(s); first: {first}":
        "agi-bitrix check: проблем: {count}; первая: {first}",
    "agi-bitrix {command}: {message}": "agi-bitrix {command}: {message}",
    # -- check: settings and files
    "{path} read ({mode} mode)": "{path} прочитан (режим {mode})",
    "{path} is readable by other users and holds secrets: chmod 600 {path}":
        "{path} могут читать другие пользователи, а в нём секреты: chmod 600 {path}",
    "the Asterisk user {user} cannot read {path}: as root run chown {user} {path}; chmod 600 {path}":
        "пользователь Asterisk {user} не может прочитать {path}: выполните от root chown {user} {path}; chmod 600 {path}",
    "the Asterisk user {user} cannot enter the folder {path}: as root run chmod o+x {path} (or chgrp {user} {path}; chmod g+x {path})":
        "пользователь Asterisk {user} не может войти в папку {path}: выполните от root chmod o+x {path} (или chgrp {user} {path}; chmod g+x {path})",
    "{path} is writable": "{path} доступна для записи",
    "{path} does not exist: run agi-bitrix install again":
        "{path} не существует: выполните agi-bitrix install ещё раз",
    "{path} is not writable by this user ({reason}); it must be writable by the user Asterisk runs as":
        "{path} недоступна этому пользователю для записи ({reason}); она должна быть доступна пользователю, от которого работает Asterisk",
    "only {mib} MiB free on the disk of {path}: call records cannot be kept when it is full; free some space":
        "на диске с {path} свободно всего {mib} МиБ: когда он заполнится, звонки не сохранятся; освободите место",
    "the Asterisk user {user} cannot write {listed}: every call step would fail; run chown -R {user}: {folders}":
        "пользователь Asterisk {user} не может писать в {listed}: все шаги звонков будут падать; выполните "
        "chown -R {user}: {folders}",
    "{count} call(s) kept in {spill} while {path} could not be written: once it can, run agi-bitrix outbox replay {spill}":
        "{count} звонков сохранено в {spill}, пока {path} была недоступна для записи: когда она снова доступна, "
        "выполните agi-bitrix outbox replay {spill}",
    # -- check: the AGI script
    "{path} not found: pass --agi-bin DIR (Asterisk's astagidir) to check the AGI script":
        "{path} не найдена: укажите --agi-bin ПАПКА (astagidir Asterisk), чтобы проверить AGI-скрипт",
    "{path} is missing: run agi-bitrix install --agi-bin {folder} again":
        "{path} отсутствует: выполните agi-bitrix install --agi-bin {folder} ещё раз",
    "{path} is not executable by the Asterisk user {user}: chmod 755 {path}":
        "{path} не исполняемый для пользователя Asterisk {user}: chmod 755 {path}",
    "{path} runs {python}, which no longer exists (the virtual environment moved?): run {entry} install --agi-bin {folder} again":
        "{path} запускает {python}, которого больше нет (виртуальное окружение перенесено?): выполните {entry} install --agi-bin {folder} ещё раз",
    "{path} runs {python}, which cannot import agi_bitrix: run {entry} install --agi-bin {folder} again":
        "{path} запускает {python}, который не может импортировать agi_bitrix: выполните {entry} install --agi-bin {folder} ещё раз",
    "{path} runs {python}": "{path} запускает {python}",
    # -- check: the outbox and recent calls
    "{count} dead letter(s): see agi-bitrix outbox status, fix the cause, then agi-bitrix outbox retry":
        "{count} записей отложено как неисправимые: см. agi-bitrix outbox status, устраните причину, затем agi-bitrix outbox retry",
    "{count} waiting for delivery, the oldest for {age} min (last error: {error}); is the worker running?":
        "{count} ждут отправки, самая старая {age} мин (последняя ошибка: {error}); работает ли worker?",
    "nothing waiting": "ничего не ждёт отправки",
    "[storage] url needs psycopg: pip install 'agi-bitrix[postgresql]'":
        "для [storage] url нужен psycopg: pip install 'agi-bitrix[postgresql]'",
    "shared store PostgreSQL at {where}, schema version {version}, this PBX is {pbx}":
        "общее хранилище PostgreSQL на {where}, версия схемы {version}, эта АТС — {pbx}",
    "other PBXs in it: {pbxs}": "другие АТС в нём: {pbxs}",
    "kept in the local journal for the shared store: {count} call(s)":
        "в локальном журнале для общего хранилища: звонков {count}",
    "no other PBX has used it yet": "другие АТС им ещё не пользовались",
    "{count} entr(y/ies) of this PBX wait in the shared store for delivery: is a worker running on some PBX?":
        "записей этой АТС ждут отправки в общем хранилище: {count}; запущен ли worker хоть на одной АТС?",
    "{count} call(s) kept in the local journal while the shared store was away: the worker moves them (or "
    "agi-bitrix outbox flush)":
        "звонков в локальном журнале, пока общее хранилище было недоступно: {count}; worker перенесёт их "
        "(или agi-bitrix outbox flush)",
    "none": "нет",
    "{errors} of {steps} call steps in the last hour ended in ERROR; the last ({event} at {time}): {reason}":
        "{errors} из {steps} шагов звонков за последний час завершились ERROR; последний ({event} в {time}): {reason}",
    "{steps} call steps in the last hour, none failed": "шагов звонков за последний час: {steps}, ошибок нет",
    # -- check: Bitrix24
    "{host} cannot be reached: {reason}: check the address in [bitrix24] {key} and the PBX's DNS (/etc/resolv.conf)":
        "{host} недоступен: {reason}: проверьте адрес в [bitrix24] {key} и DNS АТС (/etc/resolv.conf)",
    "{host} cannot be reached: {reason}: check the address in [bitrix24] {key}; a firewall or proxy may block the PBX":
        "{host} недоступен: {reason}: проверьте адрес в [bitrix24] {key}; возможно, АТС блокирует межсетевой экран или прокси",
    "{host} cannot be reached: {reason}: check the PBX's clock and CA certificates (apt install ca-certificates)":
        "{host} недоступен: {reason}: проверьте часы АТС и сертификаты (apt install ca-certificates)",
    "{host} cannot be reached: {reason}": "{host} недоступен: {reason}",
    "{host} refused the OAuth token ({code}): {fix}": "{host} отклонил OAuth-токен ({code}): {fix}",
    "{host} refused the webhook ({code}): create a new inbound webhook and put its URL into [bitrix24] webhook_url":
        "{host} отклонил вебхук ({code}): создайте новый входящий вебхук и впишите его адрес в [bitrix24] webhook_url",
    "the application may have been removed or reinstalled: run agi-bitrix auth --code CODE again":
        "приложение могли удалить или переустановить: выполните agi-bitrix auth --code КОД ещё раз",
    "{host}: {summary}": "{host}: {summary}",
    "{host} answered in {ms} ms ({mode} mode)": "{host} ответил за {ms} мс (режим {mode})",
    "the access token works{renewed}": "токен доступа работает{renewed}",
    " (renewed just now)": " (только что обновлён)",
    "the {kind} lacks the scope(s) {scopes}: {fix}": "у {kind} нет прав (scope) {scopes}: {fix}",
    "the {kind} lacks the scope(s) {scopes} the auto-dialer needs: {fix}":
        "у {kind} нет прав (scope) {scopes}, нужных автообзвону: {fix}",
    "application": "приложения",
    "webhook": "вебхука",
    "tick them in the local application's settings in Bitrix24, save, and run agi-bitrix auth --code CODE again":
        "отметьте их в настройках локального приложения в Битрикс24, сохраните и выполните agi-bitrix auth --code КОД ещё раз",
    "edit the webhook in Bitrix24 and tick them": "откройте вебхук в Битрикс24 и отметьте их",
    "scopes present: {scopes}": "права есть: {scopes}",
    "{count} with inner numbers: {listed}{more}": "{count} с внутренними номерами: {listed}{more}",
    " and {count} more": " и ещё {count}",
    "no active employee has an inner number: fill in 'Internal phone' (UF_PHONE_INNER) in the employees' profiles":
        "ни у одного активного сотрудника нет внутреннего номера: заполните «Внутренний телефон» (UF_PHONE_INNER) в профилях",
    "[calls] default_user is empty: set the inner number of whoever takes unclaimed calls":
        "[calls] default_user пуст: укажите внутренний номер того, кто принимает ничейные звонки",
    "[calls] default_user {inner} is no active employee's inner number":
        "[calls] default_user {inner} не внутренний номер ни одного активного сотрудника",
    "default_user {inner} is {name}": "default_user {inner} — это {name}",
    "cannot list employees: {summary}": "не удалось получить список сотрудников: {summary}",
    "tokens in {path} for {portal} (member_id {member})": "токены в {path} для {portal} (member_id {member})",
    "the tokens belong to {portal} but [bitrix24] portal_url names {host}":
        "токены выданы для {portal}, а в [bitrix24] portal_url указан {host}",
    "the OAuth server refused the refresh token ({reason}): run agi-bitrix auth --code CODE again":
        "OAuth-сервер отклонил refresh-токен ({reason}): выполните agi-bitrix auth --code КОД ещё раз",
    # -- check: AMI
    "AMI not configured (needed only for the dialer and click-to-call)":
        "AMI не настроен (нужен только автообзвону и звонкам из Битрикс24)",
    "AMI host {host} does not resolve (DNS): set [asterisk] ami_host to the Asterisk host, usually 127.0.0.1":
        "имя AMI {host} не разрешается (DNS): укажите в [asterisk] ami_host адрес Asterisk, обычно 127.0.0.1",
    "nothing listens on {host}:{port}: enable AMI in manager.conf ([general] enabled = yes, port = {port}), then asterisk -rx 'manager reload'":
        "на {host}:{port} никто не слушает: включите AMI в manager.conf ([general] enabled = yes, port = {port}), затем asterisk -rx 'manager reload'",
    "AMI {host}:{port} cannot be reached ({reason}): check [asterisk] ami_host and ami_port":
        "AMI {host}:{port} недоступен ({reason}): проверьте [asterisk] ami_host и ami_port",
    "{host}:{port} answers but is not AMI (it said {said}): set [asterisk] ami_port to the port in manager.conf [general] (5038 by default)":
        "{host}:{port} отвечает, но это не AMI (ответ: {said}): укажите в [asterisk] ami_port порт из manager.conf [general] (по умолчанию 5038)",
    "nothing": "ничего",
    "AMI refused the login of {user}: set [asterisk] ami_user and ami_secret to a user of manager.conf and its secret (and let its permit= allow this host), then asterisk -rx 'manager reload'":
        "AMI не пустил пользователя {user}: укажите в [asterisk] ami_user и ami_secret пользователя из manager.conf и его secret (и разрешите этот адрес в его permit=), затем asterisk -rx 'manager reload'",
    "AMI user {user} may not run {actions} (the dialer and click-to-call need them): in manager.conf [{user}] set write = originate,call and read = call, then asterisk -rx 'manager reload'":
        "пользователю AMI {user} запрещено {actions} (это нужно автообзвону и звонкам из Битрикс24): в manager.conf [{user}] укажите write = originate,call и read = call, затем asterisk -rx 'manager reload'",
    "AMI {host}:{port}: {reason}": "AMI {host}:{port}: {reason}",
    "AMI {host}:{port} answered ({banner}); {user} may originate calls":
        "AMI {host}:{port} ответил ({banner}); {user} может совершать вызовы",
    # -- outbox status
    "waiting: {pending}   delivered: {done}   dead letters: {dead}":
        "ждут отправки: {pending}   доставлено: {done}   неисправимых: {dead}",
    "oldest waiting: {age} old": "самая старая ждёт: {age}",
    "last error: {error}": "последняя ошибка: {error}",
    "dead #{id} {kind} of call {linkedid}: {error}": "неисправимая #{id} {kind} звонка {linkedid}: {error}",
    "fix the cause, then: agi-bitrix outbox retry": "устраните причину, затем: agi-bitrix outbox retry",
    "waiting by kind: {kinds}": "ждут по видам: {kinds}",
    "delivering them takes about {time} once the portal answers ({requests} request(s) at {rate} per second after a burst of {burst})":
        "их отправка займёт около {time}, когда портал отвечает ({requests} запрос(ов), {rate} в секунду после первых {burst})",
    # -- outbox flush
    "delivered {delivered}, still waiting {waiting}, dead-lettered {dead} ({calls} call(s), {requests} request(s))":
        "доставлено {delivered}, ещё ждут {waiting}, неисправимых {dead} (звонков: {calls}, запросов: {requests})",
    "stopped early, the portal failed a whole request: {reason}":
        "остановлено раньше: портал не выполнил запрос целиком: {reason}",
    "  {count} waiting ({kinds}): {reason}": "  ждут {count} ({kinds}): {reason}",
    "  {count} waiting for other reasons (agi-bitrix outbox status)":
        "  ждут {count} по другим причинам (agi-bitrix outbox status)",
    "being delivered by another deliverer ({owner}) until {time}": "их отправляет другой процесс ({owner}) до {time}",
    "behind an earlier entry of their call that waits": "стоят за более ранней записью своего звонка, которая ждёт",
    "not tried: the flush stopped early": "не отправлялись: flush остановился раньше",
    "not tried yet": "ещё не отправлялись",
    "what waits goes out with the worker (or the service) or the next flush":
        "то, что ждёт, отправит worker (или служба) или следующий flush",
    "... delivered {delivered} so far": "... доставлено пока {delivered}",
    "{n} s": "{n} с",
    "{n} min": "{n} мин",
    "{n} h": "{n} ч",
    # -- dialer status
    "the dialer has not worked on any task yet": "автообзвон ещё не работал ни с одной задачей",
    "task": "задача",
    "client": "клиент",
    "operator": "оператор",
    "attempts": "попытки",
    "next try": "след. попытка",
    "last outcome": "последний итог",
    "done": "готово",
    "now": "сейчас",
    # -- command errors (matched against the English text of the exception)
    "settings file {path} not found (run: agi-bitrix install, or set {var})":
        "файл настроек {path} не найден (выполните agi-bitrix install или задайте {var})",
    "settings file {path} is not readable by the user {user} (as root: chown {user} {path}; chmod 600 {path}; and let {user} enter its folder)":
        "файл настроек {path} недоступен для чтения пользователю {user} (от root: chown {user} {path}; chmod 600 {path}; и дайте {user} войти в его папку)",
    "settings file {path} is not UTF-8 text": "файл настроек {path} не в кодировке UTF-8",
    "settings file {path} is broken: {error}": "файл настроек {path} повреждён: {error}",
    "settings file {path}: unknown section [{section}]": "файл настроек {path}: неизвестный раздел [{section}]",
    "settings file {path}: [{section}] {key} unknown key": "файл настроек {path}: [{section}] {key} — неизвестный ключ",
    "settings file {path}: [{section}] {key} {error}": "файл настроек {path}: [{section}] {key} {error}",
    "must look like https://PORTAL/rest/USER_ID/CODE/ (copy it from the inbound webhook's page in Bitrix24)":
        "должен иметь вид https://ПОРТАЛ/rest/ID_ПОЛЬЗОВАТЕЛЯ/КОД/ (скопируйте его со страницы входящего вебхука в Битрикс24)",
    "ends with a method ({method}): remove it, keep https://PORTAL/rest/USER_ID/CODE/":
        "заканчивается методом ({method}): уберите его, оставьте https://ПОРТАЛ/rest/ID_ПОЛЬЗОВАТЕЛЯ/КОД/",
    "must be a full https:// address": "должен быть полным адресом https://",
    "Bitrix24 requires https://": "Битрикс24 требует https://",
    "must be an inner (extension) number such as 101": "должен быть внутренним номером, например 101",
    "no Bitrix24 connection configured: set [bitrix24] webhook_url, or portal_url, client_id and client_secret of a local application":
        "подключение к Битрикс24 не настроено: укажите [bitrix24] webhook_url или portal_url, client_id и client_secret локального приложения",
    "OAuth mode needs [bitrix24] {keys}: {missing} empty": "для режима OAuth нужны [bitrix24] {keys}: не заполнено {missing}",
    "set [asterisk] ami_user and ami_secret (the dialer dials through AMI)":
        "укажите [asterisk] ami_user и ami_secret (автообзвон звонит через AMI)",
    "another dialer is running (lock {path})": "уже работает другой автообзвон (блокировка {path})",
    # -- check: the call-card widgets (placements/bind.py) and agi-bitrix service
    "off ([placements] public_url is empty): dialer calls are marked on the phone only":
        "выключены ([placements] public_url пуст): звонки автообзвона отмечаются только на телефоне",
    "[placements] needs the local application (OAuth mode); a webhook cannot bind widgets":
        "[placements] требует локального приложения (режим OAuth); вебхук не может подключить виджеты",
    "the application lacks the scope placement: tick it in the local application's settings in Bitrix24, save, and run agi-bitrix auth --code again":
        "у приложения нет права placement: отметьте его в настройках локального приложения в Битрикс24, сохраните и выполните agi-bitrix auth --code ещё раз",
    "cannot read the bound widgets: {reason}": "не удалось прочитать подключённые виджеты: {reason}",
    "{code} bound to {url}": "{code} подключён к {url}",
    "{code} points to {handlers}, not {url}: run agi-bitrix auth --code again (or reinstall the application) to bind it anew":
        "{code} указывает на {handlers}, а не на {url}: выполните agi-bitrix auth --code ещё раз (или переустановите приложение), чтобы подключить его заново",
    "{code} is not bound: run agi-bitrix auth --code again (or reinstall the application) to bind it":
        "{code} не подключён: выполните agi-bitrix auth --code ещё раз (или переустановите приложение), чтобы подключить его",
    "agi-bitrix service is not running ({listen}): every call step starts a process of its own, fine for a few calls at once":
        "agi-bitrix service не запущен ({listen}): каждый шаг звонка запускает свой процесс, это годится для нескольких звонков одновременно",
    "{listen} is not agi-bitrix service (agi-bitrix serve?)": "{listen} — не agi-bitrix service (agi-bitrix serve?)",
    "agi-bitrix service is ready: FastAGI on {fastagi}": "agi-bitrix service готов: FastAGI на {fastagi}",
    "agi-bitrix service is not ready: {reasons}": "agi-bitrix service не готов: {reasons}",
}
