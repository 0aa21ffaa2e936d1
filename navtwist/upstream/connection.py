"""The connection pool's HTTP/1.1 client connections: capped response heads, bounded socket buffers.

Twisted's client limits each response header line to 16 KiB but neither the
number of lines nor obs-fold continuations: an upstream (or any allowed
origin of an C{http://} route) sending endless header lines would grow the
process without bound until a timeout.  Every connection of the shared pool
(inference routes and forwarded requests alike) counts the head as it
arrives and gives up as soon as it passes C{limits.max_response_head_bytes}
or C{limits.max_response_headers}: the call fails with L{ResponseHeadTooLarge}
inside Twisted's C{ResponseFailed}/C{ResponseNeverReceived}, which the callers
answer with a 502.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.python.failure import Failure
from twisted.web.client import Request as ClientRequest
from twisted.web.iweb import IResponse

from navtwist.upstream.decode import UnsupportedContentEncoding
from navtwist.upstream.flow import bound_socket_buffers

from navtwist.compat import CLIENT_HEADER, CLIENT_STATUS, ClientFactoryHooks, ClientProtocolHooks


class ResponseHeadTooLarge(Exception):
    """The upstream's response head passed a limit while it was arriving."""


@dataclass(frozen=True)
class HeadLimits:
    """Caps on one upstream response head, status line included."""

    max_bytes: int = 65536
    max_lines: int = 200


def limit_head(parser: object, limits: HeadLimits) -> None:
    """Make C{parser} (an C{HTTPClientParser}) raise L{ResponseHeadTooLarge} once its head passes C{limits}.

    Every line of the head counts (status line, header lines and obs-fold
    continuations), with its line ending.
    """
    received: Callable[[bytes], object] = parser.lineReceived  # type: ignore[attr-defined]
    seen = {"bytes": 0, "lines": 0}

    def lineReceived(line: bytes) -> object:
        if parser.state in (CLIENT_STATUS, CLIENT_HEADER):  # type: ignore[attr-defined]
            seen["bytes"] += len(line) + 1
            seen["lines"] += 1 if line.rstrip(b"\r") else 0  # the blank line ending the head is no header
            if seen["bytes"] > limits.max_bytes:
                raise ResponseHeadTooLarge(f"upstream response head exceeds {limits.max_bytes} bytes")
            if seen["lines"] > limits.max_lines + 1:  # the status line is not a header
                raise ResponseHeadTooLarge(f"upstream response head has more than {limits.max_lines} header lines")
        return received(line)

    parser.lineReceived = lineReceived  # type: ignore[attr-defined]


class LimitedClientProtocol(ClientProtocolHooks):
    """An HTTP/1.1 client connection whose response heads are capped and socket buffers bounded."""

    def __init__(self, quiescentCallback: Callable[[object], None], limits: HeadLimits,
                 socket_buffer: int | None) -> None:
        super().__init__(quiescentCallback)
        self._head_limits = limits
        self._socket_buffer = socket_buffer

    def connectionMade(self) -> None:
        super().connectionMade()
        if self._socket_buffer is not None:
            bound_socket_buffers(self.transport, self._socket_buffer)

    def request(self, request: ClientRequest) -> Deferred[IResponse]:
        before = self.response_parser
        result = super().request(request)
        parser = self.response_parser
        if parser is not None and parser is not before:
            limit_head(parser, self._head_limits)
        return result


def client_factory(limits: HeadLimits, socket_buffer: int | None) -> type:
    """The pool's protocol factory class (for C{HTTPConnectionPool._factory}) making L{LimitedClientProtocol}s."""

    class LimitedClientFactory(ClientFactoryHooks):
        def buildProtocol(self, addr: IAddress | None) -> LimitedClientProtocol:
            return LimitedClientProtocol(self.quiescent_callback, limits, socket_buffer)

    return LimitedClientFactory


def head_too_large(failure: Failure) -> ResponseHeadTooLarge | None:
    """The head-limit error inside a failed call's C{ResponseFailed}/C{ResponseNeverReceived}, if that is why."""
    for reason in getattr(failure.value, "reasons", ()):
        if isinstance(reason, Failure) and isinstance(reason.value, ResponseHeadTooLarge):
            return reason.value
    return None


def refused_answer(failure: Failure) -> str | None:
    """Why the proxy refused an upstream's answer, in words safe for clients and logs; None for other failures."""
    if failure.check(UnsupportedContentEncoding):
        return str(failure.value)
    too_large = head_too_large(failure)
    return None if too_large is None else str(too_large)
