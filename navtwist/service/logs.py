"""JSON-lines logs when navtwist runs as a daemon or logs to a file.

twistd picks its log observer after the plugin has built the service: the
C{--logger} factory if given, else the application's
L{twisted.logger.ILogObserver} component, else its own text observer.
L{TwistdLogging} sets that component while twistd adds the service to the
application, so with C{--logfile L} (or when daemonizing, where twistd's
default is C{twistd.log}) every event, navtwist's and Twisted's own, is one
JSON object per line in L.  In the foreground without C{--logfile}, twistd's
text observer on stdout stays, as do C{--syslog} and C{--logger}.

Each line is one compact object in the schema of docs/logging.md
(L{log_record}): C{time}, C{level}, C{event}, C{namespace}, C{message}, then
the event's own fields, not Twisted's raw event dict.  The file is a
L{LogFile} like twistd's own, rotated at a size and on SIGUSR1, but keeping
only so many rotated files (L{Rotation}).
"""
from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any, cast

from twisted.application import service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from navtwist.compat import accept_exhaustion_line

DEFAULT_DAEMON_LOGFILE = "twistd.log"  # what twistd itself uses for a daemon without --logfile
DAEMON_UMASK = 0o077  # what twistd applies to a daemon without --umask


DEFAULT_EVENT = "log"  # the event name of everything logged without event=
_FIXED_KEYS = ("time", "level", "event", "namespace", "message", "traceback")
# The fixed keys, and those of twisted.python.log (legacy) events besides the log_* ones.
_NOT_FIELDS = frozenset(_FIXED_KEYS) | {"system", "isError", "format", "printed", "why", "failure"}
_MAX_DEPTH = 8
_LEVELS = frozenset(LogLevel.iterconstants())


def log_record(event: LogEvent) -> dict[str, Any]:
    """C{event} as the object one JSON line holds (docs/logging.md).

    The fixed keys come first: C{time} (ISO 8601, UTC), C{level}, C{event}
    (the C{event=} the caller passed, else C{log}), C{namespace},
    C{message} (the formatted text), C{traceback} for a failure.  Then the
    event's own fields that are JSON data.  Left out: Twisted's C{log_*}
    keys, the keys of its legacy events (which a legacy observer may add to
    any event), fields named like a fixed key, and values that are not JSON
    data (objects).  The event itself is not changed: observers share it.
    """
    failure = event.get("log_failure")
    message = formatEvent(event)
    if failure is None and event.get("isError") and isinstance(event.get("failure"), Failure):
        failure = event["failure"]  # legacy log.err: the text would repeat the traceback
        message = str(event.get("why") or "Unhandled Error")
    name = event.get("event")
    level = event.get("log_level")
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": _iso_utc(when) if isinstance(when, (int, float)) else None,
        "level": level.name if level is not None and level in _LEVELS else "info",
        "event": name if isinstance(name, str) and name else DEFAULT_EVENT,
        "namespace": event.get("log_namespace"),
        "message": message,
    }
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if isinstance(key, str) and not key.startswith("log_") and key not in _NOT_FIELDS and _is_json(value, 0):
            record[key] = value
    return record


def json_line(event: LogEvent) -> str:
    """C{event} as one line of compact, ASCII-only JSON (L{log_record}), ending in a newline."""
    try:
        return json.dumps(log_record(event), separators=(",", ":"), allow_nan=False) + "\n"
    except (TypeError, ValueError, RecursionError):
        # An observer that raises is removed by Twisted: never lose the log for one odd event.
        return json.dumps({"time": None, "level": "error", "event": DEFAULT_EVENT, "namespace": "navtwist.logs",
                           "message": "an event could not be written as JSON"}) + "\n"


def _iso_utc(timestamp: float) -> str:
    """C{2026-05-04T12:00:00.123Z}."""
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _is_json(value: object, depth: int) -> bool:
    """Whether C{value} is JSON data: null, booleans, numbers (finite), strings, lists and string-keyed objects."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_json(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v, depth + 1) for k, v in value.items())
    return False


@dataclass(frozen=True)
class Rotation:
    """When the JSON log file rotates (its size), and how many rotated files are kept: at most
    about C{max_bytes * (keep + 1)} on disk."""

    max_bytes: int = 10_000_000
    keep: int = 5


class JSONLinesObserver(FileLogObserver):
    """Writes each event to C{file} as one line of JSON, and flushes.

    Left out: the lines Twisted's accept loop writes at the descriptor limit,
    up to three per refused client (thousands in seconds); the
    L{DescriptorWatch<navtwist.upstream.descriptors.DescriptorWatch>} counts
    them and says "out of file descriptors" once per interval instead.
    """

    def __init__(self, file: IO[Any]) -> None:
        super().__init__(file, json_line)
        self.file = file

    def __call__(self, event: LogEvent) -> None:
        if not accept_exhaustion_line(event):
            super().__call__(event)


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


def log_observer_for(twistd_options: Any, rotation: Rotation = Rotation()) -> JSONLinesObserver | None:
    """A JSON-lines observer on L{log_path_for}C{(twistd_options)}, or None
    to leave logging to twistd.

    The file is created as twistd's umask would create it (twistd opens
    logs before applying C{--umask}, or 077 for a daemon); an existing file
    keeps its mode, which L{LogFile} also gives the files it rotates to.
    It rotates at C{rotation.max_bytes} and on SIGUSR1 (as twistd's own log
    file does), to C{PATH.1}, C{PATH.2}, ...; files beyond C{rotation.keep}
    are deleted.
    """
    path = log_path_for(twistd_options)
    if path is None:
        return None
    umask = twistd_options.get("umask")
    if umask is None and not _foreground(twistd_options):
        umask = DAEMON_UMASK
    mode = None if umask is None or os.path.exists(path) else 0o666 & ~umask
    log_file = LogFile.fromFullPath(path, rotateLength=rotation.max_bytes, defaultMode=mode,
                                    maxRotatedFiles=rotation.keep)
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

    def __init__(self, twistd_options: Any, rotation: Rotation = Rotation()) -> None:
        super().__init__()
        self._twistd_options = twistd_options
        self._rotation = rotation
        self.observer: JSONLinesObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        # Only an Application (a Componentized) has a log observer; under
        # another service there is nothing to set, and one already set wins.
        if hasattr(parent, "setComponent") and parent.getComponent(ILogObserver, None) is None:
            self.observer = log_observer_for(self._twistd_options, self._rotation)
            if self.observer is not None:
                parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def twistd_service(inner: service.IService, twistd_options: Any, rotation: Rotation = Rotation()) -> TwistdLogging:
    """C{inner} under a L{TwistdLogging}: what C{makeService} returns to twistd."""
    top = TwistdLogging(twistd_options, rotation)
    inner.setServiceParent(top)
    return top
