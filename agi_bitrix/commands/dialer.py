"""`agi-bitrix dialer run [--once]` and `agi-bitrix dialer status`."""
from __future__ import annotations

import signal
import time
from datetime import datetime
from typing import Any, List

from agi_bitrix import settings as settings_mod
from agi_bitrix.admin_texts import Texts, choose_language
from agi_bitrix.commands.admin import CommandFailed


def _open(args: Any) -> Any:
    from agi_bitrix import log as log_mod
    from agi_bitrix.bitrix.factory import NotConfigured, make_client
    from agi_bitrix.store import StoreError
    from agi_bitrix.stores import open_store

    try:
        settings = settings_mod.load(getattr(args, "settings", None))
        store = open_store(settings, timeout=max(settings.storage.db_timeout, 5.0))
    except (settings_mod.SettingsError, StoreError) as exc:
        raise CommandFailed(str(exc)) from None
    logger = log_mod.configure(settings.logging.file, settings.logging.level, settings.secrets())
    if args.action == "status":
        return settings, store, None, logger
    try:
        client = make_client(settings)
    except NotConfigured as exc:
        raise CommandFailed(str(exc)) from None
    client.timeout = max(settings.bitrix24.timeout, 10.0)
    return settings, store, client, logger


def status(store: Any, t: Texts) -> int:
    from agi_bitrix.dialer.state import dialer_state

    rows = dialer_state(store).tasks()
    if not rows:
        print(t("the dialer has not worked on any task yet"))
        return 0
    print(f"{t('task'):>8}  {t('client'):<24} {t('operator'):<9} {t('attempts'):>8}  {t('next try'):<16} "
          f"{t('last outcome')}")
    for st in rows:
        when = t("done") if st.final else (datetime.fromtimestamp(st.next_try).strftime("%d.%m %H:%M")
                                           if st.next_try > time.time() else t("now"))
        print(f"{st.task_id:>8}  {st.client[:24]:<24} {st.operator[:9]:<9} {st.attempts:>8}  {when:<16} "
              f"{st.last_outcome or '-'}")
    return 0


def one_pass(dialer: Any, logger: Any) -> Any:
    """One dialer pass with its log line (`dialer run`, or the loop inside `agi-bitrix service`);
    a portal, AMI or store failure is logged and raised."""
    from agi_bitrix.bitrix.errors import BitrixError
    from agi_bitrix.pbx.ami import AMIError
    from agi_bitrix.store import StoreError

    fields: dict = {}
    started = time.monotonic()
    try:
        revive = getattr(dialer.store, "revive", None)
        if revive is not None:  # the shared store: a connection PostgreSQL dropped is opened anew
            revive()
        report = dialer.run_once(log=fields)
    except (BitrixError, AMIError, StoreError) as exc:
        logger.error("dialer_pass", reason=str(exc), **fields)
        raise
    fields.update(free=report.operators_free, due=report.due, dialed=len(report.dialed),
                  outcomes=report.outcomes, skipped=report.skipped, note=report.note or None)
    logger.info("dialer_pass", ms=int((time.monotonic() - started) * 1000), **fields)
    return report


def run(args: Any) -> int:
    settings, store, client, logger = _open(args)
    language = settings.logging.language
    if args.action == "status":
        return status(store, Texts(choose_language(getattr(args, "lang", None), language)))
    from agi_bitrix.bitrix.errors import BitrixError
    from agi_bitrix.dialer.engine import Dialer, DialerBusy, DialerLock
    from agi_bitrix.pbx.ami import AMIClient, AMIError
    from agi_bitrix.store import StoreError

    ast = settings.asterisk
    if not ast.ami_user:
        raise CommandFailed("set [asterisk] ami_user and ami_secret (the dialer dials through AMI)", language)
    stopping: List[int] = []
    if not args.once:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stopping.append(signum))
    try:
        with DialerLock(settings.storage.state_dir):
            ami = AMIClient(ast.ami_host, ast.ami_port, ast.ami_user, ast.ami_secret)
            dialer = Dialer(settings, store, client, ami)
            while True:
                try:
                    report = one_pass(dialer, logger)
                    if args.once:
                        print(f"due tasks {report.due}, free operators {report.operators_free}, "
                              f"dialed {len(report.dialed)}" + (f": {report.note}" if report.note else ""))
                        for task_id, reason in sorted(report.skipped.items()):
                            print(f"  task {task_id}: {reason}")
                        for attempt, outcome in report.outcomes.items():
                            print(f"  {attempt}: {outcome}")
                except (BitrixError, AMIError, StoreError) as exc:  # logged; the next pass tries again
                    if args.once:
                        raise CommandFailed(str(exc), language) from None
                if args.once or stopping:
                    break
                end = time.monotonic() + settings.dialer.poll_interval
                while not stopping and time.monotonic() < end:
                    time.sleep(0.2)
            ami.close()
    except DialerBusy as exc:
        raise CommandFailed(str(exc), language) from None
    return 0
