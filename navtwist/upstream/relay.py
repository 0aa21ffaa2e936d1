"""Relays one upstream response body into a client request, chunk by chunk.

The relay is both the upstream body's protocol (it receives chunks) and the
client request's streaming producer (the client's channel pauses and resumes
it).  Pausing it pauses the upstream transport, so a slow reader slows the
upstream instead of growing our memory; stopping it (the client left) stops
the upstream at once.  Each chunk is written as soon as it arrives: nothing
is coalesced or held back.
"""
from __future__ import annotations

from typing import Callable, cast

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from navtwist.outcome import Outcome
from navtwist.upstream.decode import BodyDecodeError
from navtwist.upstream.flow import StallWatch
from navtwist.upstream.redact import Redactor

# Response headers that describe one hop, not the response.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
        b"proxy-authorization", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
    }
)


@implementer(IPushProducer)
class ResponseRelay(Protocol):
    """Copies an upstream body to C{request} as it arrives, with flow control both ways.

    C{stream_error} makes the SSE event that reports a truncated stream; with
    None, a truncated body is signalled by aborting the client connection.
    C{redactor} masks secrets in the body (its held-back tail is dropped when
    the body is cut: it may be the start of a secret).
    """

    # A body's transport is only an IPushProducer (IResponse.deliverBody), not the ITransport Protocol declares.
    transport: IPushProducer  # type: ignore[assignment]

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        stream_error: Callable[[str], bytes] | None,
        idle_timeout: float,
        write_stall_timeout: float,
        done: Callable[[Outcome], None],
        on_chunk: Callable[[bytes], None] | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self._request = request
        self._redactor = redactor
        self._clock = clock
        self._stream_error = stream_error
        self._idle_timeout = idle_timeout
        self._done = done
        self._on_chunk = on_chunk
        self._cut_message = ""
        self._idle_call: IDelayedCall | None = None
        self._stall = StallWatch(clock, write_stall_timeout, request.transport, self._client_stalled)
        self._paused = False
        self._client_gone = False
        self._ended = False
        self._outcome: Outcome | None = None
        self._at_event_boundary = True
        self.bytes_relayed = 0

    # -- upstream side: the body as delivered by Response.deliverBody

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._arm_idle()

    def dataReceived(self, data: bytes) -> None:
        if self._client_gone:
            return
        self.bytes_relayed += len(data)
        if self._redactor is not None:
            data = self._redactor.feed(data)
        self._at_event_boundary = data.endswith((b"\n\n", b"\r\n\r\n"))
        self._deliver(data)
        if not self._paused:
            self._arm_idle()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_timers()
        self._ended = True
        if self._client_gone:
            self._done(self._outcome or Outcome.CLIENT_GONE)
            return
        self._request.unregisterProducer()
        if self._outcome is None and reason.check(ResponseDone, PotentialDataLoss):
            if self._redactor is not None:
                self._deliver(self._redactor.flush())
            self._request.finish()
            self._done(Outcome.OK)
            return
        outcome = self._outcome or Outcome.UPSTREAM_ERROR
        if self._outcome is None and isinstance(reason.value, BodyDecodeError):
            outcome, self._cut_message = Outcome(reason.value.outcome), str(reason.value)
        if self._stream_error is not None:
            message = f"response truncated: {self._cut_message or 'upstream connection lost'}"
            separator = b"" if self._at_event_boundary else b"\n\n"
            self._request.write(separator + self._stream_error(message))
            self._request.finish()
        else:
            # A truncated JSON body must not look complete: end the chunked
            # body without its terminator.
            cast(ITCPTransport, self._request.transport).abortConnection()
        self._done(outcome)

    def _deliver(self, data: bytes) -> None:
        self._request.write(data)
        if self._on_chunk is not None and data:
            self._on_chunk(data)  # after the write: observers never delay a chunk

    # -- client side: driven by the client's HTTP channel

    def pauseProducing(self) -> None:
        if self._paused or self._client_gone or self._ended:
            return
        self._paused = True
        self._cancel(self._idle_call)
        self._idle_call = None
        self._stall.paused()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._paused or self._client_gone or self._ended:
            return
        self._paused = False
        self._stall.resumed()
        self._arm_idle()
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The client is gone: stop reading from the upstream at once."""
        if self._client_gone or self._ended:
            return
        self._client_gone = True
        self._cancel_timers()
        self.transport.stopProducing()

    # -- timers

    def _arm_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._idle_timeout)
        else:
            self._idle_call = self._clock.callLater(self._idle_timeout, self._upstream_idle)

    def _upstream_idle(self) -> None:
        self._idle_call = None
        self.cut(Outcome.UPSTREAM_IDLE, f"upstream sent nothing for {self._idle_timeout:g} s")

    def cut(self, outcome: Outcome, message: str) -> None:
        """End the response early (a deadline passed); the client is told why."""
        if self._ended or self._client_gone:
            return
        self._outcome = outcome
        self._cut_message = message
        self.transport.stopProducing()

    def _client_stalled(self) -> None:
        """The client read nothing for too long while we had data for it."""
        self._outcome = Outcome.CLIENT_STALLED
        cast(ITCPTransport, self._request.transport).abortConnection()

    def _cancel_timers(self) -> None:
        self._cancel(self._idle_call)
        self._idle_call = None
        self._stall.cancel()

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


def client_response_headers(upstream: Headers, length: int | None) -> Headers:
    """The upstream's response headers minus hop-by-hop ones, with C{length} if known.

    Twisted's client keeps Content-Length and Connection out of
    C{response.headers} (so headers nominated by Connection cannot be seen
    here), and treq's content decoder adds an empty Content-Encoding to
    responses that had none: that one is dropped too.
    """
    dropped = set(HOP_BY_HOP) | {b"content-length"}
    if not b"".join(upstream.getRawHeaders(b"content-encoding", [])).strip():
        dropped.add(b"content-encoding")
    headers = Headers(
        {name: values for name, values in upstream.getAllRawHeaders() if name.lower() not in dropped}
    )
    if length is not None:
        headers.setRawHeaders(b"content-length", [b"%d" % length])
    return headers
