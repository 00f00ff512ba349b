"""Going on after Asterisk has its AGI step back.

Asterisk waits for the AGI process itself, not only for the end of its output: after EOF on the
script's stdout, run_agi() in Asterisk res/res_agi.c calls a blocking waitpid() on it, and the
channel does not move on until the process exits. A step that must not hold the call (the
`answer` step runs in Dial's U() gosub, before the bridge) forks: the parent exits at once, the
child, in a session of its own and with stdin/stdout/stderr on /dev/null (so Asterisk sees EOF
and no later write reaches the channel), delivers what the step journaled. Orphaned, it is
reaped by init, or by Asterisk itself where Asterisk is PID 1 (its SIGCHLD handler reaps every
child: Asterisk main/asterisk.c _child_handler).
"""
from __future__ import annotations

import os
import sys


def detach() -> bool:
    """Fork. False in the parent (which must exit now), True in the child that goes on."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if os.fork() > 0:
        return False
    os.setsid()  # no SIGHUP from Asterisk's process group or terminal reaches the delivery
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    return True
