"""Connections through the operator's parent proxy (C{upstream_proxy}): HTTP C{CONNECT}, then the caller's protocol.

Corporate networks reach the internet only through their own proxy.  With
C{upstream_proxy} set, every connection navtwist opens to an upstream is a
C{CONNECT} through it, naming the address navtwist checked (so the parent
cannot move a checked connection elsewhere by resolving the name again).
Twisted has no such endpoint: L{ParentProxyEndpoint} connects to the parent,
sends C{CONNECT}, reads the answer's head (at most L{MAX_ANSWER_HEAD} bytes),
then hands the connection to the caller's protocol with any bytes that came
after the head.  The whole exchange runs under the caller's connect timeout.
"""
from __future__ import annotations

import ipaddress
import re

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, DNSLookupError, TCPTimedOutError, TimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from navtwist.outcome import Refusal
from navtwist.interfaces import IStreamTransport

# A parent's answer to CONNECT is a status line and a few headers.
MAX_ANSWER_HEAD = 16384

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9]{2})(?: |\r?$)")


class ParentProxyError(ConnectError):
    """The parent proxy could not be used; the message is safe for clients and logs."""

    def __init__(self, message: str) -> None:
        super().__init__(string=message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ParentProxyRefused(ParentProxyError):
    """The parent answered C{CONNECT} with a status other than 2xx."""

    def __init__(self, status: int) -> None:
        super().__init__(f"parent proxy refused CONNECT: {status}")
        self.status = status


def parent_refusal(failure: Failure) -> Refusal | None:
    """The 502 a client gets when the parent proxy failed its connection, None for other failures."""
    if failure.check(ParentProxyError):
        return Refusal(502, "upstream_unreachable", str(failure.value))
    return None


def connect_request(host: str, port: int, authorization: bytes | None) -> bytes:
    """The C{CONNECT} request head for C{host:port} (IPv6 literals in brackets)."""
    try:
        bracketed = ipaddress.ip_address(host).version == 6
    except ValueError:
        bracketed = False
    authority = f"[{host}]:{port}" if bracketed else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1".encode("ascii"), b"Host: " + authority.encode("ascii")]
    if authorization is not None:
        lines.append(b"Proxy-Authorization: " + authorization)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def answer_status(head: bytes) -> int | None:
    """The status code of a parent's answer head, None if it is not HTTP/1.x."""
    match = _STATUS_LINE.match(head.split(b"\n", 1)[0])
    return int(match.group(1)) if match else None


@implementer(IHalfCloseableProtocol)
class _Handshake(Protocol):
    """The parent's side of one connection: CONNECT, its answer, then a relay to the caller's protocol.

    The caller's protocol is given the connection's own transport, so it
    writes, pauses and closes it directly; only what arrives passes through here.
    """

    transport: IStreamTransport

    def __init__(self, request: bytes, factory: IProtocolFactory, clock: IReactorTime, timeout: float) -> None:
        self._request = request
        self._factory = factory
        self._buffer = b""
        self.inner: IProtocol | None = None
        self.connecting: Deferred[IProtocol] | None = None
        self.done: Deferred[IProtocol] | None = Deferred(self._cancel)
        self._timer: IDelayedCall | None = clock.callLater(timeout, self._expire)

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self.done is None:
            return  # timed out or cancelled: the connection is being dropped
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_ANSWER_HEAD:
                self.fail(ParentProxyError("parent proxy's answer to CONNECT is too large"))
            return
        head, rest, self._buffer = self._buffer[:end], self._buffer[end + 4:], b""
        status = answer_status(head)
        if status is None:
            self.fail(ParentProxyError("parent proxy sent an invalid answer to CONNECT"))
        elif not 200 <= status < 300:
            self.fail(ParentProxyRefused(status))
        else:
            self._established(rest)

    def _established(self, rest: bytes) -> None:
        inner = self._factory.buildProtocol(self.transport.getPeer())
        if inner is None:
            self.fail(ConnectError(string="the protocol factory refused the connection"))
            return
        self._stop_timer()
        self.inner = inner
        inner.makeConnection(self.transport)
        done, self.done = self.done, None
        assert done is not None
        done.callback(inner)
        if rest:  # after the caller has its protocol, as on any new connection
            inner.dataReceived(rest)

    def readConnectionLost(self) -> None:
        if self.inner is not None and IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.inner is not None and IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
        else:
            self.fail(ParentProxyError("parent proxy closed the connection before answering CONNECT"))

    def not_connected(self, failure: Failure) -> None:
        """Connecting to the parent failed: say so, keeping timeouts timeouts."""
        if failure.check(CancelledError, TimeoutError, TCPTimedOutError):
            self.fail(failure)
        elif failure.check(ConnectError, DNSLookupError):
            self.fail(ParentProxyError("cannot connect to the parent proxy"))
        else:
            self.fail(failure)

    def fail(self, reason: Failure | Exception) -> None:
        """End the attempt (once) with C{reason}, dropping the connection to the parent."""
        done, self.done = self.done, None
        if done is None:
            return
        self._stop_timer()
        if self.transport is not None:
            self.transport.abortConnection()
        done.errback(reason)

    def _expire(self) -> None:
        self._timer = None
        self.fail(TimeoutError(string="the parent proxy did not connect the destination in time"))
        self._stop_connecting()

    def _cancel(self, result: Deferred[IProtocol]) -> None:
        self.fail(CancelledError())
        self._stop_connecting()

    def _stop_connecting(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()  # nothing happens once connected

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class PreparedFactory(Factory):
    """Hands one protocol built beforehand to the one connection it is for
    (without Twisted's "Starting factory" log line per connection)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol


@implementer(IStreamClientEndpoint)
class ParentProxyEndpoint:
    """C{host:port} reached with C{CONNECT} through the parent proxy that C{to_parent} dials.

    C{authorization} is the C{Proxy-Authorization} value, if the parent wants
    one.  C{timeout} bounds connecting to the parent and its answer together;
    its expiry is a L{TimeoutError}.  A refusal is a L{ParentProxyRefused},
    other trouble with the parent a L{ParentProxyError} (both C{ConnectError}s).
    """

    def __init__(self, clock: IReactorTime, to_parent: IStreamClientEndpoint, host: str, port: int,
                 timeout: float, authorization: bytes | None = None) -> None:
        self._clock = clock
        self._to_parent = to_parent
        self._request = connect_request(host, port, authorization)
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        handshake = _Handshake(self._request, protocolFactory, self._clock, self._timeout)
        result = handshake.done
        assert result is not None
        handshake.connecting = self._to_parent.connect(PreparedFactory(handshake))
        handshake.connecting.addErrback(handshake.not_connected)
        return result
