"""Running out of file descriptors: said as such, counted, and made less likely.

At the descriptor limit every new socket fails with C{EMFILE} (or C{ENFILE}
for the whole system): Twisted reports an upstream connect as
C{ConnectBindError} and clients get a 502/503 that reads like a broken
upstream.  L{DescriptorWatch} recognises that failure wherever a connection
is dialled (L{watched} endpoints) and in Twisted's accept loop (a log
observer), counts it, and logs "out of file descriptors" at most once per
interval with the count.  At start the soft C{RLIMIT_NOFILE} is raised to the
hard limit (L{raise_nofile_limit}), and idle pooled upstream connections are
held to a share of the budget (L{IdleBudget}), so keep-alive caches cannot
take the descriptors that live connections need.
"""
from __future__ import annotations

import errno
import resource
import weakref
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger, LogEvent
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from navtwist.compat import IdleCappedPoolHooks, accept_exhausted

log = Logger(namespace="navtwist")

EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
LOG_INTERVAL = 10.0  # seconds between two "out of file descriptors" lines
IDLE_SHARE = 4  # idle pooled connections may hold at most 1/IDLE_SHARE of the soft limit
NR_OPEN = Path("/proc/sys/fs/nr_open")


def is_exhaustion(failure: Failure | BaseException) -> bool:
    """Whether a connect failed because the process or the system has no descriptor left."""
    error = failure.value if isinstance(failure, Failure) else failure
    if isinstance(error, ConnectError):
        return error.osError in EXHAUSTED_ERRNOS
    return isinstance(error, OSError) and error.errno in EXHAUSTED_ERRNOS


class DescriptorWatch:
    """Counts descriptor exhaustion and logs it at most once per C{interval}, with the count.

    The first failure is logged at once; failures within the next C{interval}
    are summed and logged when it ends, so a burst gives two lines, not
    thousands.  C{counted(operation)} is called for every failure (the metric).
    """

    def __init__(self, clock: IReactorTime, counted: Callable[[str], None], interval: float = LOG_INTERVAL) -> None:
        self._clock = clock
        self._counted = counted
        self._interval = interval
        self._pending: dict[str, int] = {}
        self._call: IDelayedCall | None = None
        self.total = 0

    def record(self, operation: str) -> None:
        """One socket that could not be made: C{operation} is C{"connect"} or C{"accept"}."""
        self.total += 1
        self._counted(operation)
        self._pending[operation] = self._pending.get(operation, 0) + 1
        if self._call is None:
            self._flush()

    def check(self, failure: Failure, operation: str = "connect") -> Failure:
        """An errback: records C{failure} if it is exhaustion, and passes it on unchanged."""
        if is_exhaustion(failure):
            self.record(operation)
        return failure

    def observe(self, event: LogEvent) -> None:
        """A log observer: Twisted's accept loop logs (and survives) C{EMFILE} on the listener."""
        if accept_exhausted(event):
            self.record("accept")

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _flush(self) -> None:
        self._call = None
        if not self._pending:
            return
        counts = ", ".join(f"{n} {operation}" for operation, n in sorted(self._pending.items()))
        self._pending = {}
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.error("out of file descriptors: {counts} failed in the last {interval:g} s (limit {limit}); "
                  "clients get 502/503 until descriptors are free: raise LimitNOFILE / ulimit -n",
                  counts=counts, interval=self._interval, limit=soft)
        self._call = self._clock.callLater(self._interval, self._flush)


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint, watch: DescriptorWatch) -> None:
        self._endpoint = endpoint
        self._watch = watch

    def connect(self, factory: Any) -> Deferred[Any]:
        return self._endpoint.connect(factory).addErrback(self._watch.check)


def watched(endpoint: IStreamClientEndpoint, watch: DescriptorWatch | None) -> IStreamClientEndpoint:
    """C{endpoint}, with connect failures from exhaustion recorded by C{watch} (when there is one)."""
    return endpoint if watch is None else _WatchedEndpoint(endpoint, watch)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft C{RLIMIT_NOFILE} to the hard limit (or the kernel's C{nr_open}); (old, new) soft limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(NR_OPEN.read_text())
        except (OSError, ValueError):
            return soft, soft
    if target <= soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, target


class IdleBudget:
    """A cap on idle keep-alive connections summed over every pool made by L{pool}.

    A pool hands back a connection that went idle; beyond C{limit} idle ones
    in all pools together it is closed instead of kept.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pools: weakref.WeakSet[IdleCappedPoolHooks] = weakref.WeakSet()

    @classmethod
    def for_soft_limit(cls) -> IdleBudget:
        """A budget of 1/L{IDLE_SHARE} of the current soft C{RLIMIT_NOFILE}."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return cls(max(1, soft // IDLE_SHARE))

    def idle(self) -> int:
        return sum(pool.idle_count() for pool in self._pools)

    def admits(self) -> bool:
        return self.idle() < self.limit

    def pool(self, reactor: Any, per_host: int) -> HTTPConnectionPool:
        """A persistent pool keeping at most C{per_host} idle connections per key, within this budget."""
        pool = IdleCappedPoolHooks(reactor, persistent=True)
        pool.maxPersistentPerHost = min(per_host, self.limit)
        pool.admits = self.admits
        self._pools.add(pool)
        return pool
