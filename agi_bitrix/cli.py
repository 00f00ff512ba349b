"""The console entry: AGI mode when Asterisk runs it, admin subcommands otherwise."""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import List, Optional

ADMIN_COMMANDS = ("install", "check", "demo", "auth", "outbox", "worker", "dialer", "serve", "service", "migrate")


def _agi_mode(argv: List[str]) -> bool:
    from agi_bitrix.agi.session import isatty_stdin
    from agi_bitrix.controllers import EVENTS

    if argv and (argv[0] in ADMIN_COMMANDS or argv[0].startswith("-")):
        return False
    # Asterisk puts AST_AGI_DIR (and friends) into every AGI child's environment.
    return bool(os.environ.get("AST_AGI_DIR")) or (bool(argv) and argv[0] in EVENTS and not isatty_stdin())


def main(argv: Optional[List[str]] = None) -> int:
    started = time.monotonic()
    args = list(sys.argv[1:] if argv is None else argv)
    hangups: List[bool] = []
    if _agi_mode(args):
        # First thing: the caller may hang up at any moment, and SIGHUP kills a plain Python process.
        signal.signal(signal.SIGHUP, lambda *_: hangups.append(True))
        from agi_bitrix import dispatcher

        dispatcher.run(args, hangups, started)
        # Asterisk has its answer and the log line is written (the log flushes each line, the
        # database is closed): skip the interpreter's teardown, a tenth of the step's cost.
        sys.stdout.flush()
        os._exit(0)
    from agi_bitrix.commands import admin

    return admin.main(args)


if __name__ == "__main__":
    raise SystemExit(main())
