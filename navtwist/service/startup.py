"""Checks made before twistd daemonizes, so that start-up fails with one line, not a traceback.

twistd writes the pidfile, opens the log and listens after it has built the
service (and, for a daemon, forked); a missing directory or a port already
taken then surfaces as a traceback, or as a daemon's truncated "An error has
occurred".  Checked here, from C{makeService}, each is one line on stderr and
exit status 1 before anything is written.
"""
from __future__ import annotations

import os
from typing import Any

from navtwist.config import Config
from navtwist.service.listen import check_can_listen
from navtwist.service.logs import log_path_for


def check_before_start(config: Config, twistd_options: Any) -> None:
    """The pidfile's and log file's directories are writable and the endpoints can be bound.

    @param twistd_options: twistd's C{ServerOptions} (the plugin options'
        C{parent}), or None when not run by twistd.
    @raise SystemExit: with one line naming the problem and the fix.
    """
    if twistd_options is not None:
        _check_pidfile(twistd_options)
        log_path = log_path_for(twistd_options)
        if log_path is not None:
            _check_writable(log_path, "log file", "or pass another --logfile")
    check_can_listen("listen", config.listen)
    if config.admin_listen is not None:
        check_can_listen("admin_listen", config.admin_listen)


def _check_pidfile(twistd_options: Any) -> None:
    if twistd_options.get("chroot"):  # paths inside the chroot: not checkable from here
        return
    rundir = twistd_options.get("rundir") or "."
    if not os.path.isdir(rundir):
        raise SystemExit(f"navtwist: cannot change to the --rundir {rundir}: it does not exist; create it")
    pidfile = twistd_options.get("pidfile")  # twistd has made it absolute
    if pidfile:
        _check_writable(os.path.abspath(pidfile), "pidfile", "or pass --pidfile= for none")


def _check_writable(path: str, what: str, alternative: str) -> None:
    directory = os.path.dirname(path)
    if os.path.exists(path):
        problem = None if os.access(path, os.W_OK) else "it is not writable by this user"
    elif not os.path.isdir(directory):
        problem = f"the directory {directory} does not exist; create it"
    elif not os.access(directory, os.W_OK | os.X_OK):
        problem = f"the directory {directory} is not writable by this user"
    else:
        problem = None
    if problem is not None:
        raise SystemExit(f"navtwist: cannot write the {what} {path}: {problem} ({alternative})")
