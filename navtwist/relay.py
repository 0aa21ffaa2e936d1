"""Relays one upstream response into a client request, chunk by chunk.

L{Exchange} covers the wait for the upstream's response head (first-byte
timeout, cancellation when the client leaves); L{ResponseRelay} the body.
The relay is both the upstream body's protocol (it receives chunks) and the
client request's streaming producer (the client's channel pauses and resumes
it).  Pausing it pauses the upstream transport, so a slow reader slows the
upstream instead of growing our memory; stopping it (the client left) stops
the upstream at once.  Each chunk is written as soon as it arrives: nothing
is coalesced or held back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request
from zope.interface import implementer

log = Logger(namespace="navtwist.relay")

# Response headers that describe one hop, not the response.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
        b"proxy-authorization", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
    }
)

# Outcomes reported to the caller when the relay ends.
OK = "ok"
CLIENT_GONE = "client_gone"
CLIENT_STALLED = "client_stalled"
UPSTREAM_ERROR = "upstream_error"
UPSTREAM_IDLE = "upstream_idle_timeout"


@implementer(IPushProducer)
class ResponseRelay(Protocol):
    """Copies an upstream body to C{request} as it arrives, with flow control both ways.

    C{stream_error} makes the SSE event that reports a truncated stream; with
    None, a truncated body is signalled by aborting the client connection.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        stream_error: Callable[[str], bytes] | None,
        idle_timeout: float,
        write_stall_timeout: float,
        done: Callable[[str], None],
    ) -> None:
        self._request = request
        self._clock = clock
        self._stream_error = stream_error
        self._idle_timeout = idle_timeout
        self._write_stall_timeout = write_stall_timeout
        self._done = done
        self._idle_call: IDelayedCall | None = None
        self._stall_call: IDelayedCall | None = None
        self._paused = False
        self._client_gone = False
        self._ended = False
        self._outcome: str | None = None
        self._at_event_boundary = True
        self.bytes_relayed = 0
        self.first_chunk_at: float | None = None

    # -- upstream side: the body as delivered by Response.deliverBody

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._arm_idle()

    def dataReceived(self, data: bytes) -> None:
        if self._client_gone:
            return
        if self.first_chunk_at is None:
            self.first_chunk_at = self._clock.seconds()
        self.bytes_relayed += len(data)
        self._at_event_boundary = data.endswith((b"\n\n", b"\r\n\r\n"))
        self._request.write(data)
        if not self._paused:
            self._arm_idle()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_timers()
        self._ended = True
        if self._client_gone:
            self._done(self._outcome or CLIENT_GONE)
            return
        self._request.unregisterProducer()
        if self._outcome is None and reason.check(ResponseDone, PotentialDataLoss):
            self._request.finish()
            self._done(OK)
            return
        outcome = self._outcome or UPSTREAM_ERROR
        if self._stream_error is not None:
            message = (
                f"response truncated: upstream sent nothing for {self._idle_timeout:g} s"
                if outcome == UPSTREAM_IDLE
                else "response truncated: upstream connection lost"
            )
            separator = b"" if self._at_event_boundary else b"\n\n"
            self._request.write(separator + self._stream_error(message))
            self._request.finish()
        else:
            # A truncated JSON body must not look complete: end the chunked
            # body without its terminator.
            self._request.transport.abortConnection()
        self._done(outcome)

    # -- client side: driven by the client's HTTP channel

    def pauseProducing(self) -> None:
        if self._paused or self._client_gone or self._ended:
            return
        self._paused = True
        self._cancel(self._idle_call)
        self._idle_call = None
        self._stall_call = self._clock.callLater(self._write_stall_timeout, self._client_stalled)
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._paused or self._client_gone or self._ended:
            return
        self._paused = False
        self._cancel(self._stall_call)
        self._stall_call = None
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
        self._outcome = UPSTREAM_IDLE
        self.transport.stopProducing()

    def _client_stalled(self) -> None:
        """The client read nothing for too long while we had data for it."""
        self._stall_call = None
        self._outcome = CLIENT_STALLED
        self._request.transport.abortConnection()

    def _cancel_timers(self) -> None:
        self._cancel(self._idle_call)
        self._cancel(self._stall_call)
        self._idle_call = self._stall_call = None

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
    for value in upstream.getRawHeaders(b"connection", []):
        dropped.update(token.strip().lower() for token in value.split(b","))
    if not b"".join(upstream.getRawHeaders(b"content-encoding", [])).strip():
        dropped.add(b"content-encoding")
    headers = Headers(
        {name: values for name, values in upstream.getAllRawHeaders() if name.lower() not in dropped}
    )
    if length is not None:
        headers.setRawHeaders(b"content-length", [b"%d" % length])
    return headers


@dataclass(frozen=True)
class RelayTimeouts:
    """Deadlines of one exchange, in seconds; none applies to a stream that keeps moving."""

    first_byte: float
    idle: float
    write_stall: float


class _Discard(Protocol):
    """Takes a response nobody will read and closes its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class Exchange:
    """One upstream call on behalf of C{request}, from sending it to the end of the answer.

    C{fail(failure, timed_out)} answers the client when no response head came
    (its error shape is the caller's business); C{stream_error} is passed to
    the relay for SSE responses; C{keep_length} keeps the upstream's
    Content-Length instead of re-chunking.  C{fields} describe the call in the
    one log event written when it ends.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        timeouts: RelayTimeouts,
        fail: Callable[[Failure, bool], str],
        stream_error: Callable[[str], bytes] | None,
        keep_length: bool,
        fields: dict[str, Any],
    ) -> None:
        self._request = request
        self._clock = clock
        self._timeouts = timeouts
        self._fail = fail
        self._stream_error = stream_error
        self._keep_length = keep_length
        self._fields = fields
        self._started = clock.seconds()
        self._pending: Deferred[IResponse] | None = None
        self._first_byte_call: IDelayedCall | None = None
        self._timed_out = False
        self._client_left = False
        self._relay: ResponseRelay | None = None
        self._status: int | None = None
        self._headers_at: float | None = None
        request.notifyFinish().addErrback(self._client_gone)

    def start(self, pending: Deferred[IResponse]) -> None:
        """Wait for C{pending}, the upstream response, and relay it."""
        if self._client_left:
            pending.cancel()
        self._pending = pending
        self._first_byte_call = self._clock.callLater(self._timeouts.first_byte, self._first_byte_timeout)
        pending.addCallbacks(self._got_response, self._failed)

    def _first_byte_timeout(self) -> None:
        self._first_byte_call = None
        self._timed_out = True
        if self._pending is not None:
            self._pending.cancel()

    def _client_gone(self, reason: Failure) -> None:
        self._client_left = True
        if self._relay is not None:
            self._relay.stopProducing()
        elif self._pending is not None:
            self._pending.cancel()

    def _settled(self) -> None:
        self._pending = None
        if self._first_byte_call is not None and self._first_byte_call.active():
            self._first_byte_call.cancel()
        self._first_byte_call = None

    def _got_response(self, response: IResponse) -> None:
        self._settled()
        self._headers_at = self._clock.seconds()
        self._status = response.code
        if self._client_left:
            response.deliverBody(_Discard())
            self._finished(CLIENT_GONE)
            return
        request = self._request
        request.setResponseCode(response.code, response.phrase or None)
        keep_length = self._keep_length and response.length is not UNKNOWN_LENGTH
        request.responseHeaders = client_response_headers(response.headers, response.length if keep_length else None)
        request.write(b"")  # the status line and headers go out now, before any body
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        is_sse = content_type.lower().startswith(b"text/event-stream")
        self._relay = ResponseRelay(
            request,
            self._clock,
            stream_error=self._stream_error if is_sse else None,
            idle_timeout=self._timeouts.idle,
            write_stall_timeout=self._timeouts.write_stall,
            done=self._finished,
        )
        response.deliverBody(self._relay)

    def _failed(self, failure: Failure) -> None:
        self._settled()
        if self._client_left:
            self._finished(CLIENT_GONE)
            return
        log.warn("upstream call failed: {fields} error={error}", fields=self._fields, error=failure.type.__name__)
        self._finished(self._fail(failure, self._timed_out))

    def _finished(self, outcome: str) -> None:
        now = self._clock.seconds()
        log.info(
            "relayed {fields} status={status} outcome={outcome} headers_ms={headers_ms} "
            "duration_ms={duration_ms} bytes={bytes}",
            fields=" ".join(f"{k}={v}" for k, v in self._fields.items()),
            status=self._status if self._status is not None else self._request.code,
            outcome=outcome,
            headers_ms=None if self._headers_at is None else round((self._headers_at - self._started) * 1000, 1),
            duration_ms=round((now - self._started) * 1000, 1),
            bytes=0 if self._relay is None else self._relay.bytes_relayed,
            **self._fields,
        )
