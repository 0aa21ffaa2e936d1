"""Ctrl-C while twistd starts navtwist: one line, not a traceback from wherever Python was.

Start-up is mostly imports, which begin when twistd asks the plugin for its
options (C{twisted/plugins/navtwist_plugin.py}), so this module imports
nothing but the standard library, to be cheap to install that early.
"""
from __future__ import annotations

import signal
import sys
from typing import Any

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def quiet_interrupts() -> None:
    """From now on, SIGINT ends the process with one line on stderr and status 130.

    Only over Python's default handler: a SIGINT that is ignored (a shell's
    background job) or handled by someone else stays so.
    """
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def quiet_until_running(reactor: Any) -> None:
    """L{quiet_interrupts} until C{reactor} runs, then the reactor's own SIGINT handling.

    The reactor installs its handler (stop, as for SIGTERM) only over
    Python's default one, which is put back just before.
    """
    quiet_interrupts()
    if signal.getsignal(signal.SIGINT) is _interrupted:
        reactor.addSystemEventTrigger("before", "startup", signal.signal, signal.SIGINT, signal.default_int_handler)


def _interrupted(signum: int, frame: object) -> None:
    print("navtwist: interrupted during start-up", file=sys.stderr)
    raise SystemExit(INTERRUPTED)
