"""Argument parsing for the admin commands. Exit codes: 0 ok, 1 failure (one line on stderr), 2 usage."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from agi_bitrix import __version__
from agi_bitrix.admin_texts import LANGUAGES, Texts, choose_language


class CommandFailed(Exception):
    """A command cannot go on; the message is the one line for stderr (exit 1), in English;
    `language` is the [logging] language when the settings were read."""

    def __init__(self, message: str, language: Optional[str] = None) -> None:
        super().__init__(message)
        self.language = language


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"agi-bitrix: {message} (see agi-bitrix --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agi-bitrix", description=(
        "Asterisk -> Bitrix24 integration. Asterisk runs it as AGI(agi-bitrix,EVENT,...); "
        "administrators use the commands below."))
    parser.add_argument("--version", action="version", version=f"agi-bitrix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--lang", choices=LANGUAGES, help="language of the texts (default: [logging] language, "
                        "else the locale: LC_ALL, LC_MESSAGES, LANG)")
    p = sub.add_parser("install", parents=[common],
                       help="put the AGI script into Asterisk's agi-bin, create settings and folders")
    p.add_argument("--agi-bin", required=True, help="Asterisk's astagidir, e.g. /var/lib/asterisk/agi-bin")
    p.add_argument("--settings", help="settings file (default /etc/agi-bitrix/settings.ini)")
    p.add_argument("--owner", help="user Asterisk runs as (default: the owner of --agi-bin)")
    p = sub.add_parser("check", parents=[common], help="diagnose settings, Bitrix24 and Asterisk in plain words")
    p.add_argument("--settings", help="settings file (default /etc/agi-bitrix/settings.ini)")
    p.add_argument("--agi-bin", help="Asterisk's astagidir, to check the AGI script "
                   "(default /var/lib/asterisk/agi-bin)")
    p = sub.add_parser("auth", parents=[common], help="store OAuth tokens for the local application (mode 2)")
    p.add_argument("--settings", help="settings file (default /etc/agi-bitrix/settings.ini)")
    group = p.add_mutually_exclusive_group(required=True)
    # Secrets are read from standard input or a file: a command line is visible to every user in `ps`.
    group.add_argument("--code", nargs="?", const="-", metavar="-",
                       help="authorization code, or the whole address of the redirect (valid 30 s), "
                            "read from standard input (typed without echo, or piped)")
    group.add_argument("--code-file", metavar="PATH", help="read the authorization code from a file")
    group.add_argument("--refresh-token", nargs="?", const="-", metavar="-",
                       help="a refresh token of the application, read from standard input")
    group.add_argument("--refresh-token-file", metavar="PATH", help="read a refresh token from a file")
    p = sub.add_parser("outbox", parents=[common], help="call records kept while Bitrix24 was unreachable")
    p.add_argument("action", choices=("flush", "status", "retry", "replay"), help="flush: deliver now; status: "
                   "counts; retry: put dead letters back in line; replay FILE...: bring back what call steps "
                   "could not journal (from the log or the spill file), then flush")
    p.add_argument("files", nargs="*", metavar="FILE", help="for replay: the log and/or spill file(s)")
    p.add_argument("--settings", help="settings file (default /etc/agi-bitrix/settings.ini)")
    p = sub.add_parser("worker", parents=[common], help="deliver the outbox continuously (systemd service)")
    p.add_argument("--settings", help="settings file (default /etc/agi-bitrix/settings.ini)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between passes (default 5)")
    p = sub.add_parser("serve", parents=[common],
                       help="HTTP handler for Bitrix24 events (click-to-call) and the install callback")
    p.add_argument("--settings", help="settings file (default /etc/agi-bitrix/settings.ini)")
    p = sub.add_parser("service", parents=[common], help="the long-lived service: FastAGI call steps, outbox, events, HTTP, "
                       "dialer (systemd)")
    p.add_argument("--settings", help="settings file (default /etc/agi-bitrix/settings.ini)")
    p = sub.add_parser("dialer", parents=[common], help="the auto-dialer driven by Bitrix24 call tasks")
    p.add_argument("action", choices=("run", "status"), help="run: dial (loop); status: a table of the tasks")
    p.add_argument("--once", action="store_true", help="one pass, then exit (for cron or a first try)")
    p.add_argument("--settings", help="settings file (default /etc/agi-bitrix/settings.ini)")
    p = sub.add_parser("migrate", parents=[common], help="bring the state database (SQLite, or the PostgreSQL "
                       "store of [storage] url) to this version's schema")
    p.add_argument("--settings", help="settings file (default /etc/agi-bitrix/settings.ini)")
    p = sub.add_parser("demo", parents=[common], help="simulated calls against the built-in Bitrix24 emulator")
    p.add_argument("--keep", metavar="DIR", help="keep the demo's settings, state and log in DIR")
    return parser


def main(argv: List[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    import importlib

    run = importlib.import_module(f"agi_bitrix.commands.{args.command}").run
    try:
        return run(args)
    except CommandFailed as exc:
        texts = Texts(choose_language(args.lang, exc.language))
        print(texts("agi-bitrix {command}: {message}", command=args.command, message=texts.translate(str(exc))),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
