"""One upstream call on behalf of a client request, from sending it to the end of the answer.

Before the first byte goes to the client an exchange may try several
candidate upstreams in order (fallback); once a byte has gone out it is
committed to the current one, so output is never duplicated.  Every wait has
a deadline: first byte per candidate, total for non-streaming calls, and the
relay's own idle and write-stall timeouts for the body.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol as TypingProtocol, Sequence

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request

from navtwist.relay import (
    CLIENT_GONE,
    CLIENT_STALLED,
    OK,
    TIMEOUT,
    UPSTREAM_ERROR,
    UPSTREAM_IDLE,
    ResponseRelay,
    client_response_headers,
)

log = Logger(namespace="navtwist.exchange")

HEARTBEAT_COMMENT = b": keep-alive\n\n"

REJECTED = "rejected"
# The request log's outcome is one of a few classes; the detail says which case.
_OUTCOME_CLASSES = {
    CLIENT_STALLED: CLIENT_GONE,
    UPSTREAM_IDLE: TIMEOUT,
    "upstream_timeout": TIMEOUT,
    "route_busy": REJECTED,
    "policy_denied": REJECTED,
    "ssrf_denied": REJECTED,
    "bad_request": REJECTED,
}


def outcome_class(detail: str) -> str:
    """ok, client_gone, timeout, rejected or upstream_error."""
    if detail in (OK, CLIENT_GONE, TIMEOUT):
        return detail
    return _OUTCOME_CLASSES.get(detail, UPSTREAM_ERROR)


class RouteBusy(Exception):
    """Every candidate was at its concurrency limit."""


class UpstreamStatus(Exception):
    """A candidate answered with a status its route falls back on."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status


class ExchangeListener(TypingProtocol):
    """Told what happened to an exchange: for metrics."""

    def attempt_failed(self, failure: Failure, timed_out: bool) -> None: ...

    def ended(self, record: dict[str, Any]) -> None: ...


class Gate(TypingProtocol):
    """Admission for one upstream: at most some number of calls at once."""

    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...


class OpenGate:
    """A gate without a limit."""

    def try_acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


@dataclass(frozen=True)
class Deadlines:
    """Deadlines of one candidate, in seconds; none cuts a stream that keeps moving."""

    first_byte: float
    idle: float
    write_stall: float
    total: float | None = None  # for non-streaming calls


@dataclass(frozen=True)
class Attempt:
    """One candidate upstream: how to call it and when to give up on it."""

    send: Callable[[], Deferred[IResponse]]
    deadlines: Deadlines
    fields: dict[str, Any]  # what the request log says about this candidate
    fallback_on: frozenset[int] = frozenset()
    heartbeat: float | None = None
    gate: Gate = field(default_factory=OpenGate)


class ChunkObserver(TypingProtocol):
    """Looks at each relayed chunk after it was written, and summarises at the end."""

    def feed(self, chunk: bytes) -> None: ...

    def summary(self) -> dict[str, Any]: ...

    def ended(self, record: dict[str, Any]) -> None: ...


class _Discard(Protocol):
    """Takes a response nobody will read and closes its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class Exchange:
    """Tries C{attempts} in order until one answers, then relays its answer to C{request}.

    C{fail(failure, timed_out)} writes the client's error when no candidate
    answered (its shape is the caller's business) and returns the outcome;
    C{stream_error(message)} makes the SSE event that reports a cut stream;
    C{keep_length} keeps the upstream's Content-Length; C{streaming} says the
    client asked for a stream (heartbeats apply, the total deadline does not);
    C{observe(is_sse)} gives an observer of the body; C{listener} hears of
    failed candidates and of the end.  C{fields} describe the call in the one
    log event written when it ends.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        fail: Callable[[Failure, bool], str],
        stream_error: Callable[[str], bytes] | None,
        keep_length: bool,
        fields: dict[str, Any],
        streaming: bool = False,
        observe: Callable[[bool], ChunkObserver] | None = None,
        listener: ExchangeListener | None = None,
    ) -> None:
        self._request = request
        self._clock = clock
        self._fail = fail
        self._stream_error = stream_error
        self._keep_length = keep_length
        self._fields = dict(fields)
        self._streaming = streaming
        self._observe = observe
        self._listener = listener
        self._started = clock.seconds()
        self._attempts: list[Attempt] = []
        self._current: Attempt | None = None
        self._tried = 0
        self._pending: Deferred[IResponse] | None = None
        self._first_byte_call: IDelayedCall | None = None
        self._total_call: IDelayedCall | None = None
        self._heartbeat_call: IDelayedCall | None = None
        self._heartbeat_interval = 0.0
        self._timed_out = False
        self._client_left = False
        self._committed = False  # a byte has gone to the client: no more fallback
        self._relay: ResponseRelay | None = None
        self._observer: ChunkObserver | None = None
        self._status: int | None = None
        self._headers_at: float | None = None
        self._ended = False
        request.notifyFinish().addErrback(self._client_gone)

    # -- driving the candidates

    def start(self, attempts: Sequence[Attempt]) -> None:
        self._attempts = list(attempts)
        if attempts and self._streaming and attempts[0].heartbeat:
            self._heartbeat_interval = attempts[0].heartbeat
            self._heartbeat_call = self._clock.callLater(self._heartbeat_interval, self._heartbeat)
        if attempts and not self._streaming and attempts[0].deadlines.total:
            self._total_call = self._clock.callLater(attempts[0].deadlines.total, self._total_expired)
        self._next(None)

    def _next(self, failure: Failure | None) -> None:
        """Start the next candidate that admits us; with none left, report C{failure}."""
        while self._attempts and not self._client_left:
            attempt = self._attempts.pop(0)
            if not attempt.gate.try_acquire():
                continue
            self._current = attempt
            self._tried += 1
            self._timed_out = False
            self._first_byte_call = self._clock.callLater(attempt.deadlines.first_byte, self._first_byte_timeout)
            self._pending = pending = maybeDeferred(attempt.send)
            pending.addCallbacks(self._got_response, self._failed, (attempt,), None, (attempt,))
            return
        if self._client_left:
            self._end(CLIENT_GONE)
        elif failure is None:
            self._give_up(Failure(RouteBusy()), False)
        else:
            self._give_up(failure, self._timed_out)

    def _can_fall_back(self) -> bool:
        return bool(self._attempts) and not self._committed and not self._client_left

    def _settled(self) -> None:
        self._pending = None
        self._cancel(self._first_byte_call)
        self._first_byte_call = None

    def _failed(self, failure: Failure, attempt: Attempt) -> None:
        self._settled()
        attempt.gate.release()
        if self._client_left:
            self._end(CLIENT_GONE)
            return
        log.warn("upstream call failed: {fields} error={error}", fields=attempt.fields, error=failure.type.__name__)
        if self._listener is not None:
            self._listener.attempt_failed(failure, self._timed_out)
        if self._can_fall_back():
            self._next(failure)
        else:
            self._give_up(failure, self._timed_out)

    def _got_response(self, response: IResponse, attempt: Attempt) -> None:
        self._settled()
        self._status = response.code
        if self._client_left:
            attempt.gate.release()
            response.deliverBody(_Discard())
            self._end(CLIENT_GONE)
            return
        if response.code in attempt.fallback_on and self._can_fall_back():
            log.info("falling back: {fields} answered {status}", fields=attempt.fields, status=response.code)
            if self._listener is not None:
                self._listener.attempt_failed(Failure(UpstreamStatus(response.code)), False)
            attempt.gate.release()
            response.deliverBody(_Discard())
            self._next(None)
            return
        self._headers_at = self._clock.seconds()
        self._stop_heartbeat()
        if self._committed and response.code >= 400:
            attempt.gate.release()
            response.deliverBody(_Discard())
            self._stream_failed(f"inference service answered HTTP {response.code}")
            return
        self._relay_body(response, attempt)

    def _relay_body(self, response: IResponse, attempt: Attempt) -> None:
        request = self._request
        if self._committed:
            is_sse = True  # heartbeats already promised an event stream
        else:
            request.setResponseCode(response.code, response.phrase or None)
            keep_length = self._keep_length and response.length is not UNKNOWN_LENGTH
            request.responseHeaders = client_response_headers(response.headers, response.length if keep_length else None)
            request.write(b"")  # the status line and headers go out now, before any body
            self._committed = True
            content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
            is_sse = content_type.lower().startswith(b"text/event-stream")
        self._observer = self._observe(is_sse) if self._observe is not None else None

        def done(outcome: str) -> None:
            attempt.gate.release()
            self._end(outcome)

        self._relay = ResponseRelay(
            request,
            self._clock,
            stream_error=self._stream_error if is_sse else None,
            idle_timeout=attempt.deadlines.idle,
            write_stall_timeout=attempt.deadlines.write_stall,
            done=done,
            on_chunk=self._observer.feed if self._observer is not None else None,
        )
        response.deliverBody(self._relay)

    def _give_up(self, failure: Failure, timed_out: bool) -> None:
        if self._committed:
            self._stream_failed("inference service unavailable")
        else:
            self._end(self._fail(failure, timed_out))

    def _stream_failed(self, message: str) -> None:
        """After heartbeats the status is already 200: report the failure in the stream."""
        if self._stream_error is not None:
            self._request.write(self._stream_error(message))
        self._request.finish()
        self._end(UPSTREAM_ERROR)

    # -- deadlines and the client

    def _first_byte_timeout(self) -> None:
        self._first_byte_call = None
        self._timed_out = True
        if self._pending is not None:
            self._pending.cancel()

    def _total_expired(self) -> None:
        """The whole non-streaming call took too long: no more candidates either."""
        self._total_call = None
        self._attempts = []
        if self._relay is not None:
            self._relay.cut(TIMEOUT, "total timeout exceeded")
        elif self._pending is not None:
            self._timed_out = True
            self._pending.cancel()

    def _heartbeat(self) -> None:
        """Keep idle-sensitive middleboxes from cutting a long prefill: commit to 200 early."""
        request = self._request
        if not self._committed:
            self._committed = True
            request.setResponseCode(200)
            request.responseHeaders.setRawHeaders(b"content-type", [b"text/event-stream"])
            request.responseHeaders.setRawHeaders(b"cache-control", [b"no-cache"])
        request.write(HEARTBEAT_COMMENT)
        self._heartbeat_call = self._clock.callLater(self._heartbeat_interval, self._heartbeat)

    def _stop_heartbeat(self) -> None:
        self._cancel(self._heartbeat_call)
        self._heartbeat_call = None

    def _client_gone(self, reason: Failure) -> None:
        self._client_left = True
        self._stop_heartbeat()
        if self._relay is not None:
            self._relay.stopProducing()
        elif self._pending is not None:
            self._pending.cancel()

    def _end(self, outcome: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._stop_heartbeat()
        self._cancel(self._total_call)
        now = self._clock.seconds()
        summary = self._observer.summary() if self._observer is not None else {}
        if outcome == CLIENT_GONE and summary.pop("complete", False):
            # SDKs close as soon as they see the final event, sometimes before
            # the chunked terminator reached them: nothing was lost.
            outcome = OK
        summary.pop("complete", None)
        record: dict[str, Any] = {
            **self._fields,
            **(self._current.fields if self._current is not None else {}),
            "candidates_tried": self._tried,
            "status": self._status if self._status is not None else self._request.code,
            "outcome": outcome_class(outcome),
            "detail": outcome,
            "headers_ms": _ms(self._started, self._headers_at),
            "duration_ms": _ms(self._started, now),
            "bytes": 0 if self._relay is None else self._relay.bytes_relayed,
        }
        if summary:
            record["ttft_ms"] = _ms(self._started, summary.pop("first_token_at", None))
            record.update(summary)
        self.record = record
        log.info(" ".join(["request"] + [f"{key}={{{key}}}" for key in record]), event="request", **record)
        if self._observer is not None:
            self._observer.ended(record)
        if self._listener is not None:
            self._listener.ended(record)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


def _ms(start: float, at: float | None) -> float | None:
    return None if at is None else round((at - start) * 1000, 1)

