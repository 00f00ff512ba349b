"""Argument parsing for the admin commands. Exit codes: 0 ok, 1 failure (one line on stderr), 2 usage."""
from __future__ import annotations

import argparse
import sys
from typing import List

from agi_bitrix import __version__


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
    p = sub.add_parser("install", help="put the AGI script into Asterisk's agi-bin, create settings and folders")
    p.add_argument("--agi-bin", required=True, help="Asterisk's astagidir, e.g. /var/lib/asterisk/agi-bin")
    p.add_argument("--settings", help="settings file (default /etc/agi-bitrix/settings.ini)")
    p.add_argument("--owner", help="user Asterisk runs as (default: the owner of --agi-bin)")
    p = sub.add_parser("check", help="diagnose settings, Bitrix24 and Asterisk in plain words")
    p.add_argument("--settings", help="settings file (default /etc/agi-bitrix/settings.ini)")
    p = sub.add_parser("demo", help="simulated calls against the built-in Bitrix24 emulator")
    p.add_argument("--keep", metavar="DIR", help="keep the demo's settings, state and log in DIR")
    return parser


def main(argv: List[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "install":
        from agi_bitrix.commands.install import run
    elif args.command == "check":
        from agi_bitrix.commands.check import run
    else:
        from agi_bitrix.commands.demo import run
    try:
        return run(args)
    except KeyboardInterrupt:
        return 1
