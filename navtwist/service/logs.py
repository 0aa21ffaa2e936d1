"""JSON-lines logs when navtwist runs as a daemon or logs to a file.

twistd picks its log observer after the plugin has built the service: the
C{--logger} factory if given, else the application's
L{twisted.logger.ILogObserver} component, else its own text observer.
L{TwistdLogging} sets that component while twistd adds the service to the
application, so with C{--logfile L} (or when daemonizing, where twistd's
default is C{twistd.log}) every event, navtwist's and Twisted's own, is one
JSON object per line in L.  In the foreground without C{--logfile}, twistd's
text observer on stdout stays, as do C{--syslog} and C{--logger}.

Each line is the event as L{twisted.logger.eventAsJSON} writes it (so
L{twisted.logger.eventsFromJSONLogFile} reads the file back), plus
C{"log_text"}: the rendered message, with the traceback for failures.
The file is a L{LogFile} like twistd's own: it rotates at 1 MB to C{L.1},
C{L.2}, ..., and on SIGUSR1.
"""
from __future__ import annotations

import os
import signal
from typing import IO, Any, cast

from twisted.application import service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, eventAsJSON, eventAsText
from twisted.python.logfile import LogFile

DEFAULT_DAEMON_LOGFILE = "twistd.log"  # what twistd itself uses for a daemon without --logfile
DAEMON_UMASK = 0o077  # what twistd applies to a daemon without --umask


def json_line(event: LogEvent) -> str:
    """C{event} as one line of JSON, ending in a newline.

    The event is copied: observers share event dicts, and flattening it or
    adding C{log_text} must not change what the others see.
    """
    event = dict(event)
    event.pop("log_logger", None)  # a Logger object, which would be {"unpersistable": true}
    if "log_text" not in event:  # legacy (twisted.python.log) events already carry it
        event["log_text"] = eventAsText(event, includeTimestamp=False, includeSystem=False)
    return eventAsJSON(event) + "\n"  # eventAsJSON escapes every newline inside the event


class JSONLinesObserver(FileLogObserver):
    """Writes each event to C{file} as one line of JSON, and flushes."""

    def __init__(self, file: IO[Any]) -> None:
        super().__init__(file, json_line)
        self.file = file


def log_path_for(twistd_options: Any) -> str | None:
    """The file twistd would log to for the command line C{twistd_options}
    (twistd's C{ServerOptions}, the plugin options' C{parent}), or None
    where it logs elsewhere.

    That is C{--logfile PATH}, or C{twistd.log} for a daemon without it.
    None for the foreground without C{--logfile}, C{--logfile=-} (stdout;
    twistd refuses it for a daemon), C{--syslog}, C{--logger}, and when not
    run by twistd (C{twistd_options} None).
    """
    if twistd_options is None:
        return None
    option = twistd_options.get
    if option("logger") or option("syslog"):
        return None
    path = option("logfile") or ""
    if path == "-" or (_foreground(twistd_options) and not path):
        return None
    return os.path.abspath(path or DEFAULT_DAEMON_LOGFILE)


def log_observer_for(twistd_options: Any) -> JSONLinesObserver | None:
    """A JSON-lines observer on L{log_path_for}C{(twistd_options)}, or None
    to leave logging to twistd.

    The file is created as twistd's umask would create it (twistd opens
    logs before applying C{--umask}, or 077 for a daemon); an existing file
    keeps its mode, which L{LogFile} also gives the files it rotates to.
    SIGUSR1 rotates it, as it does twistd's own log file.
    """
    path = log_path_for(twistd_options)
    if path is None:
        return None
    umask = twistd_options.get("umask")
    if umask is None and not _foreground(twistd_options):
        umask = DAEMON_UMASK
    mode = None if umask is None or os.path.exists(path) else 0o666 & ~umask
    log_file = LogFile.fromFullPath(path, defaultMode=mode)
    _rotate_on_sigusr1(log_file)
    return JSONLinesObserver(log_file)


def _foreground(twistd_options: Any) -> bool:
    return bool(twistd_options.get("nodaemon") or twistd_options.get("debug"))


def _rotate_on_sigusr1(log_file: LogFile) -> None:
    """What twistd does for its own log file, unless SIGUSR1 is already handled."""
    if not hasattr(signal, "SIGUSR1") or signal.getsignal(signal.SIGUSR1) not in (None, signal.SIG_DFL):
        return

    def rotate(signum: int, frame: object) -> None:
        from twisted.internet import reactor

        # Twisted types the installed reactor by only a few of the interfaces every reactor provides.
        cast(IReactorFromThreads, reactor).callFromThread(log_file.rotate)

    signal.signal(signal.SIGUSR1, rotate)


class TwistdLogging(service.MultiService):
    """The service handed to twistd: sets the application's log observer
    when twistd adds it to the application.

    twistd calls C{makeService}, then C{setServiceParent(application)}, and
    only then starts logging with the application's L{ILogObserver}
    component (L{twisted.application.app.ApplicationRunner.run}), so the
    observer is in place before the first event is written; events logged
    while the service was built are buffered by Twisted and written then.
    """

    def __init__(self, twistd_options: Any) -> None:
        super().__init__()
        self._twistd_options = twistd_options
        self.observer: JSONLinesObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        # Only an Application (a Componentized) has a log observer; under
        # another service there is nothing to set, and one already set wins.
        if hasattr(parent, "setComponent") and parent.getComponent(ILogObserver, None) is None:
            self.observer = log_observer_for(self._twistd_options)
            if self.observer is not None:
                parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def twistd_service(inner: service.IService, twistd_options: Any) -> TwistdLogging:
    """C{inner} under a L{TwistdLogging}: what C{makeService} returns to twistd."""
    top = TwistdLogging(twistd_options)
    inner.setServiceParent(top)
    return top
