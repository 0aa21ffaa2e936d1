"""CONNECT tunnels: bytes spliced both ways with flow control, as in portforward.

Each side's transport is registered as the other side's streaming producer,
so a side that cannot write fast enough pauses reading on the other side and
the proxy never buffers more than a transport's own write buffer.  A
half-close (FIN) is passed on; when both directions have ended, or either
side's connection is lost, the other side is closed too.  A side whose peer takes nothing
for the write-stall timeout while data waits for it ends the tunnel (progress, not
pause time, counts: see navtwist/upstream/flow.py).
"""
from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from navtwist.interfaces import IStreamTransport
from navtwist.upstream.flow import StallWatch


@implementer(IPushProducer)
class _Pacer:
    """Registered on one side (the writer) in place of the other side's transport (the reader).

    It passes pause/resume on and tells a L{StallWatch} on the writer: the
    tunnel ends when the writer's peer has taken nothing for C{timeout}
    seconds while the reader was paused for it.
    """

    def __init__(self, reader: IStreamTransport, writer: IStreamTransport, clock: IReactorTime, timeout: float,
                 stalled: Callable[[], None]) -> None:
        self._reader = reader
        self._watch = StallWatch(clock, timeout, writer, stalled)

    def pauseProducing(self) -> None:
        self._watch.paused()
        self._reader.pauseProducing()

    def resumeProducing(self) -> None:
        self._watch.resumed()
        self._reader.resumeProducing()

    def stopProducing(self) -> None:
        self.cancel()
        self._reader.stopProducing()

    def cancel(self) -> None:
        self._watch.cancel()


class Splice:
    """The two transports of one tunnel and the rules that join them."""

    def __init__(self, client: IStreamTransport, clock: IReactorTime, write_stall_timeout: float) -> None:
        self.client = client
        self.upstream: IStreamTransport | None = None
        self._clock = clock
        self._write_stall_timeout = write_stall_timeout
        self._watches: list[_Pacer] = []
        self._client_eof = False
        self._upstream_eof = False
        self._closed = False
        self.bytes_up = 0
        self.bytes_down = 0

    def start(self, upstream: IStreamTransport, early_data: bytes = b"") -> None:
        """Join C{upstream} to the client; C{early_data} came from the client already."""
        self.upstream = upstream
        for writer, reader in ((self.client, upstream), (upstream, self.client)):
            watch = _Pacer(reader, writer, self._clock, self._write_stall_timeout, self.abort)
            self._watches.append(watch)
            writer.registerProducer(watch, True)
        if early_data:
            self.from_client(early_data)

    def from_client(self, data: bytes) -> None:
        self.bytes_up += len(data)
        assert self.upstream is not None, "the client spoke before the tunnel opened"
        self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self.client.write(data)

    def client_eof(self) -> None:
        """The client will send no more: pass the FIN on."""
        self._client_eof = True
        assert self.upstream is not None, "the client closed before the tunnel opened"
        self.upstream.loseWriteConnection()
        self._close_if_done()

    def upstream_eof(self) -> None:
        self._upstream_eof = True
        self.client.loseWriteConnection()
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self._client_eof and self._upstream_eof:
            self.close()

    def close(self) -> None:
        """End both sides after what is already written has been sent."""
        if self._closed:
            return
        self._closed = True
        for watch in self._watches:
            watch.cancel()
        self.client.loseConnection()
        if self.upstream is not None:
            self.upstream.loseConnection()

    def abort(self) -> None:
        """End both sides at once: one of them stopped reading."""
        self._closed = True
        for watch in self._watches:
            watch.cancel()
        self.client.abortConnection()
        if self.upstream is not None:
            self.upstream.abortConnection()


@implementer(IHalfCloseableProtocol)
class TunnelUpstream(Protocol):
    """The destination's side of a tunnel: what it sends goes to the client."""

    transport: IStreamTransport

    def __init__(self, splice: Splice) -> None:
        self._splice = splice

    def dataReceived(self, data: bytes) -> None:
        self._splice.from_upstream(data)

    def readConnectionLost(self) -> None:
        self._splice.upstream_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._splice.close()


class TunnelUpstreamFactory(Factory):
    """Connects one destination for one tunnel."""

    noisy = False

    def __init__(self, splice: Splice) -> None:
        self._splice = splice

    def buildProtocol(self, addr: IAddress | None) -> TunnelUpstream:
        return TunnelUpstream(self._splice)
