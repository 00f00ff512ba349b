"""Admin texts in Russian and English: chosen by --lang, [logging] language or the locale."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from agi_bitrix import admin_texts
from agi_bitrix.admin_texts import RU, Texts, choose_language


def test_language_precedence():
    assert choose_language(environ={}) == "en"
    assert choose_language(environ={"LANG": "ru_RU.UTF-8"}) == "ru"
    assert choose_language(environ={"LANG": "ru_RU.UTF-8", "LC_MESSAGES": "C"}) == "en"
    assert choose_language(environ={"LANG": "C", "LC_MESSAGES": "ru_RU", "LC_ALL": "en_US.UTF-8"}) == "en"
    assert choose_language(setting="ru", environ={"LANG": "en_US"}) == "ru"
    assert choose_language(setting="auto", environ={"LC_ALL": "ru_RU.UTF-8"}) == "ru"
    assert choose_language("en", "ru", {"LC_ALL": "ru_RU"}) == "en"


def test_formatted_english_errors_are_translated_whole():
    t = Texts("ru")
    assert t.translate("settings file /etc/x.ini: [calls] default_user must be an inner (extension) number "
                       "such as 101") == ("файл настроек /etc/x.ini: [calls] default_user должен быть внутренним "
                                          "номером, например 101")
    assert t.translate("something nobody translated") == "something nobody translated"
    assert Texts("en").translate("settings file /x not found (run: agi-bitrix install, or set V)") == \
        "settings file /x not found (run: agi-bitrix install, or set V)"


def test_catalogue_placeholders_match():
    for english, russian in RU.items():
        assert set(re.findall(r"\{(\w+)\}", english)) == set(re.findall(r"\{(\w+)\}", russian)), english


def _templates(path: Path):
    """The templates of report.ok/warn/problem(area, template) and t(template) calls in a module."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        index = {"ok": 1, "warn": 1, "problem": 1, "t": 0}.get(name)
        template = node.args[index] if index is not None and len(node.args) > index else None
        if isinstance(template, ast.Constant):
            yield template.value
        elif isinstance(template, ast.JoinedStr):
            yield ast.unparse(template)  # an f-string is formatted before it could be looked up: never translated


ADMIN_MODULES = ["commands/check.py", "commands/outbox.py", "commands/dialer.py", "placements/bind.py"]


@pytest.mark.parametrize("module", ADMIN_MODULES)
def test_every_admin_text_has_a_russian_translation(module):
    root = Path(admin_texts.__file__).parent
    found = list(_templates(root / module))
    assert found, module
    missing = [text for text in found if text not in RU]
    assert missing == []


def test_check_in_russian_by_the_locale_or_the_setting(pbx):
    res = pbx.admin("check", env={"LANG": "ru_RU.UTF-8"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "всё в порядке" in res.stdout and "ОК       bitrix24" in res.stdout
    assert "default_user 101 — это Anna Test" in res.stdout

    assert "all good" in pbx.admin("check", "--lang", "en", env={"LANG": "ru_RU.UTF-8"}).stdout

    pbx.set("logging", "language", "ru")
    res = pbx.admin("check", env={"LANG": "C.UTF-8"})
    assert "всё в порядке" in res.stdout


def test_check_problem_and_command_error_in_russian(pbx, tmp_path):
    pbx.set("calls", "default_user", "555")
    res = pbx.admin("check", env={"LC_ALL": "ru_RU.UTF-8"})
    assert res.returncode == 1
    assert "ПРОБЛЕМА calls      [calls] default_user 555 не внутренний номер ни одного активного сотрудника" \
        in res.stdout
    assert res.stderr.startswith("agi-bitrix check: проблем: 1; первая: calls: [calls] default_user 555")

    missing = tmp_path / "nowhere.ini"
    res = pbx.admin("outbox", "status", "--settings", str(missing), env={"LC_ALL": "ru_RU.UTF-8"})
    assert res.returncode == 1
    assert res.stderr.strip() == (f"agi-bitrix outbox: файл настроек {missing} не найден "
                                  "(выполните agi-bitrix install или задайте AGI_BITRIX_SETTINGS)")
    res = pbx.admin("outbox", "status", "--settings", str(missing), env={"LC_ALL": "C"})
    assert res.stderr.startswith(f"agi-bitrix outbox: settings file {missing} not found")


def test_outbox_and_dialer_status_in_russian(pbx):
    res = pbx.admin("outbox", "status", env={"LANG": "ru_RU.UTF-8"})
    assert res.returncode == 0 and "ждут отправки: 0   доставлено: 0   неисправимых: 0" in res.stdout
    res = pbx.admin("dialer", "status", env={"LANG": "ru_RU.UTF-8"})
    assert res.returncode == 0 and "автообзвон ещё не работал ни с одной задачей" in res.stdout
    res = pbx.cli("dialer", "run", "--once", env={"LANG": "ru_RU.UTF-8"})
    assert res.returncode == 1
    assert res.stderr.strip() == ("agi-bitrix dialer: укажите [asterisk] ami_user и ami_secret "
                                  "(автообзвон звонит через AMI)")
