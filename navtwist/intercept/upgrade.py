"""Protocol upgrades (WebSocket) on intercepted hosts.

The rules judge the upgrade request like any other.  An allowed one is sent
to the origin over its own verified TLS connection; if the origin answers
C{101 Switching Protocols}, that answer goes to the client and from then on
the two connections are spliced both ways, with the same flow control as a
tunnel (L{navtwist.egress.tunnel.Splice}).  Any other answer refuses the
upgrade with a 502 naming the origin's status: a non-101 answer on a
connection about to become raw bytes cannot be relayed as HTTP safely.
"""
from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from navtwist.egress.tunnel import Splice
from navtwist.interfaces import IStreamTransport
from navtwist.outcome import Refusal

# Hop-by-hop headers an upgrade keeps: they are the upgrade.
UPGRADE_HEADERS = (b"connection", b"upgrade")


def upgrade_head(method: bytes, target: bytes, headers: Headers, client: Headers) -> bytes:
    """The request head sent to the origin: C{headers} (end-to-end, Host set) plus the upgrade's own."""
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    for name, values in headers.getAllRawHeaders():
        lines.extend(b"%s: %s" % (name, value) for value in values)
    lines.append(b"Connection: Upgrade")
    lines.extend(b"Upgrade: %s" % value for value in client.getRawHeaders(b"upgrade", []))
    return b"\r\n".join(lines) + b"\r\n\r\n"


@implementer(IHalfCloseableProtocol)
class UpgradeClient(Protocol):
    transport: IStreamTransport
    """The origin's side of an upgrade: sends the head, reads the answer's head, then splices.

    C{answered} fires with (this protocol, the 101 head and any bytes after
    it) or fails with a L{Refusal}.  After L{spliced}, every byte goes to the
    splice.
    """

    def __init__(self, head: bytes, max_head_bytes: int, clock: IReactorTime, timeout: float) -> None:
        self._head = head
        self._max = max_head_bytes
        self._clock = clock
        self._timeout = timeout
        self._buffer = b""
        self._call: IDelayedCall | None = None
        self._splice: Splice | None = None
        self.answered: Deferred[tuple[UpgradeClient, bytes]] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._head)
        self._call = self._clock.callLater(self._timeout, self._give_up, "the origin did not answer the upgrade in time")

    def spliced(self, splice: Splice) -> None:
        self._splice = splice

    def dataReceived(self, data: bytes) -> None:
        if self._splice is not None:
            self._splice.from_upstream(data)
            return
        if self.answered.called:
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self._max:
                self._give_up("the origin's answer to the upgrade has an oversized head")
            return
        status_line = self._buffer.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or parts[0] != b"HTTP/1.1" or parts[1] != b"101":
            shown = parts[1].decode("ascii", "replace") if len(parts) > 1 else "garbage"
            self._give_up(f"the origin refused the upgrade (status {shown[:3]})")
            return
        self._stop_timer()
        answer, self._buffer = self._buffer, b""
        self.answered.callback((self, answer))

    def readConnectionLost(self) -> None:
        if self._splice is not None:
            self._splice.upstream_eof()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self._splice is not None:
            self._splice.close()
        elif not self.answered.called:
            self.answered.errback(Failure(Refusal(502, "upstream_error", "the origin closed the upgrade")))

    def _give_up(self, message: str) -> None:
        self._stop_timer()
        if not self.answered.called:
            self.answered.errback(Failure(Refusal(502, "upgrade_refused", message)))
        self.transport.abortConnection()

    def _stop_timer(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
