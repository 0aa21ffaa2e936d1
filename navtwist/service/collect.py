"""Reference cycles left by closed connections, collected in step with the closes.

Twisted leaves every closed TLS connection in reference cycles: the
transport and its TLS layer point at each other, and the C{Failure} that
Twisted's TLS layer makes when a peer hangs up without C{close_notify} (every
aborted handshake, most clients) keeps its frames, and through them the
C{OpenSSL.SSL.Connection} (about 60 KiB of OpenSSL memory), alive until a
collector pass.  L{tune_gc<navtwist.service.server_tap.tune_gc>} makes those
passes rare, and the objects of a connection that was open at a young
collection end up in the oldest generation, which it collects only after
about a hundred million allocations: 25,000 aborted handshakes left navtwist
85 MiB above its warm size (bench/tls_abort.py).  L{ClosedCollector} runs a
full collection once enough connections have closed since the last one:
at least C{minimum}, and at least C{ratio} times those still open, so the
collector's work (proportional to what is alive plus the garbage) stays a
small constant per closed connection however many are open.
"""
from __future__ import annotations

import gc
from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

MINIMUM = 500  # closed connections between two collections, at least
RATIO = 2  # ... and at least this many times the connections still open


class ClosedCollector:
    """A full garbage collection after every C{max(minimum, ratio × open())} closed connections.

    The collection runs from the reactor (C{clock.callLater(0)}), not inside
    the C{connectionLost} that triggered it, so its frames are gone first.
    """

    def __init__(self, clock: IReactorTime, open_connections: Callable[[], int], minimum: int = MINIMUM,
                 ratio: int = RATIO, collect: Callable[[int], int] = gc.collect) -> None:
        self._clock = clock
        self._open = open_connections
        self._minimum = minimum
        self._ratio = ratio
        self._collect = collect
        self._closed = 0
        self._call: IDelayedCall | None = None

    def closed(self) -> None:
        """One client connection has closed."""
        self._closed += 1
        if self._call is None and self._closed >= max(self._minimum, self._ratio * self._open()):
            self._call = self._clock.callLater(0, self._run)

    def _run(self) -> None:
        self._call = None
        self._closed = 0
        self._collect(2)
