"""One upstream call on behalf of a client request, from sending it to the end of the answer.

Before the first byte goes to the client an exchange may try several
candidate upstreams in order (fallback); once a byte has gone out it is
committed to the current one, so output is never duplicated.  Every wait has
a deadline: first byte per candidate, total for non-streaming calls, and the
relay's own idle and write-stall timeouts for the body.

An exchange is in one L{Phase} at a time and moves only as L{_TRANSITIONS}
allow.  A candidate's concurrency slot is held for the lifetime of its call
(sent, answered, body relayed or discarded) and freed in one place, at the
end of that call's Deferred chain.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import partial
import typing
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from navtwist.interfaces import IDrainCut
from navtwist.outcome import Outcome, Refusal, outcome_class
from navtwist.upstream.body import Discard
from navtwist.upstream.connection import refused_answer
from navtwist.upstream.failures import Cause, RouteBusy, StreamCut, UpstreamStatus, classify, describe
from navtwist.upstream.redact import Redactor
from navtwist.upstream.relay import ResponseRelay, client_response_headers

log = Logger(namespace="navtwist.exchange")

HEARTBEAT_COMMENT = b": keep-alive\n\n"
DRAIN_MESSAGE = "the proxy is shutting down"


class ExchangeListener(typing.Protocol):
    """Told what happened to an exchange: for metrics."""

    def attempt_failed(self, failure: Failure, timed_out: bool) -> None: ...

    def ended(self, record: dict[str, Any]) -> None: ...


class Gate(typing.Protocol):
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
    secrets: tuple[bytes, ...] = ()  # masked in its error answers' bodies (an upstream may echo its key)


class ChunkObserver(typing.Protocol):
    """Looks at each relayed chunk after it was written, and summarises at the end."""

    def feed(self, chunk: bytes) -> None: ...

    def summary(self) -> dict[str, Any]: ...

    def ended(self, record: dict[str, Any]) -> None: ...


class Phase(enum.Enum):
    """Where an exchange is."""

    WAITING = "waiting"  # calling candidates; nothing sent to the client, so fallback is possible
    HEARTBEATING = "heartbeating"  # 200 and keep-alive comments sent while a candidate thinks
    LEAVING = "leaving"  # the client left before an answer: the call under way is being cancelled
    RELAYING = "relaying"  # a candidate's answer is going to the client
    ENDED = "ended"  # the record is written


class Event(enum.Enum):
    """What moves an exchange from one phase to the next."""

    HEARTBEAT = "heartbeat"  # a keep-alive comment is due
    RELAY = "relay"  # an answer is accepted: its body starts flowing
    CLIENT_LEFT = "client_left"
    END = "end"


# How a relayed body ends when the upstream cut it short.
_UPSTREAM_CUTS = frozenset({Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_IDLE, Outcome.UPSTREAM_DECODE_ERROR,
                            Outcome.UPSTREAM_DECODE_LIMIT})

# Every move an exchange can make; anything else is a bug.
_TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.WAITING, Event.HEARTBEAT): Phase.HEARTBEATING,
    (Phase.HEARTBEATING, Event.HEARTBEAT): Phase.HEARTBEATING,
    (Phase.WAITING, Event.RELAY): Phase.RELAYING,
    (Phase.HEARTBEATING, Event.RELAY): Phase.RELAYING,
    (Phase.WAITING, Event.CLIENT_LEFT): Phase.LEAVING,
    (Phase.HEARTBEATING, Event.CLIENT_LEFT): Phase.LEAVING,
    (Phase.RELAYING, Event.CLIENT_LEFT): Phase.RELAYING,  # the relay stops the upstream, then ends
    (Phase.WAITING, Event.END): Phase.ENDED,
    (Phase.HEARTBEATING, Event.END): Phase.ENDED,
    (Phase.LEAVING, Event.END): Phase.ENDED,
    (Phase.RELAYING, Event.END): Phase.ENDED,
}

# What a call decided, run once its slot is free: the next candidate, or the end.
Step = Callable[[], None]


@implementer(IDrainCut)
class Exchange:
    """Tries C{attempts} in order until one answers, then relays its answer to C{request}.

    C{fail(failure, timed_out)} writes the client's error when no candidate
    answered (its shape is the caller's business) and returns the record's
    detail (the refusal's code); C{stream_error(message)} makes the SSE event
    that reports a cut stream; C{keep_length} keeps the upstream's
    Content-Length; C{streaming} says the client asked for a stream
    (heartbeats apply, the total deadline does not); C{observe(is_sse)} gives
    an observer of the body; C{listener} hears of failed candidates and of
    the end.  C{fields} describe the call in the one log event written when
    it ends.  The exchange is C{request}'s L{IDrainCut} component: a graceful
    stop ends it through L{drain_cut}.
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
        self._phase = Phase.WAITING
        self._started = clock.seconds()
        self._attempts: list[Attempt] = []  # candidates not called yet
        self._current: Attempt | None = None
        self._tried = 0
        self._pending: Deferred[IResponse] | None = None  # the call awaiting its answer's head
        self._timed_out = False  # a deadline of ours cancelled the pending call
        self._first_byte_call: IDelayedCall | None = None
        self._total_call: IDelayedCall | None = None
        self._heartbeat_call: IDelayedCall | None = None
        self._heartbeat_interval = 0.0
        self._relay: ResponseRelay | None = None
        self._observer: ChunkObserver | None = None
        self._status: int | None = None
        self._headers_at: float | None = None
        self._left_as = Outcome.CLIENT_GONE  # how an exchange whose client is no longer served ends
        request.notifyFinish().addErrback(self._client_gone)
        request.setComponent(IDrainCut, self)

    def _move(self, event: Event) -> None:
        """Take C{event}: the one place the phase changes."""
        try:
            self._phase = _TRANSITIONS[self._phase, event]
        except KeyError:
            raise RuntimeError(f"exchange: {event.value} while {self._phase.value}") from None

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
        """Call the next candidate that admits us; with none left, report C{failure}."""
        if self._phase is Phase.LEAVING:
            self._end(self._left_as)
            return
        while self._attempts:
            attempt = self._attempts.pop(0)
            if attempt.gate.try_acquire():
                self._call(attempt)
                return
        if failure is None:
            self._give_up(Failure(RouteBusy()), False)
        else:
            self._give_up(failure, self._timed_out)

    def _call(self, attempt: Attempt) -> None:
        """Call one candidate, holding its slot until the call is over: failed,
        its answer discarded, or its answer relayed to the end."""
        self._current = attempt
        self._tried += 1
        self._timed_out = False
        self._first_byte_call = self._clock.callLater(attempt.deadlines.first_byte, self._first_byte_timeout)
        self._pending = call = maybeDeferred(attempt.send)
        stepped = call.addCallbacks(self._answered, self._call_failed, callbackArgs=(attempt,), errbackArgs=(attempt,))
        stepped.addBoth(self._release, attempt.gate).addCallback(lambda step: step()).addErrback(
            lambda failure: log.failure("exchange failed", failure))

    @staticmethod
    def _release(result: Step | Failure, gate: Gate) -> Step | Failure:
        """The one place a candidate's slot is freed."""
        gate.release()
        return result

    def _can_fall_back(self) -> bool:
        return bool(self._attempts) and self._phase is Phase.WAITING

    def _settled(self) -> None:
        self._pending = None
        self._cancel(self._first_byte_call)
        self._first_byte_call = None

    def _call_failed(self, failure: Failure, attempt: Attempt) -> Step:
        self._settled()
        if self._phase is Phase.LEAVING:
            return partial(self._end, self._left_as)
        fields = {**self._fields, **attempt.fields}
        refusal = failure.value
        if isinstance(refusal, Refusal) and classify(failure, self._timed_out) is Cause.REFUSED:
            log.info("destination refused ({code}): {message} {fields}", code=refusal.code,
                     message=refusal.message, fields=fields)
        else:
            log.warn("upstream call failed: {fields} error={error}", fields=fields,
                     error=refused_answer(failure) or describe(failure, self._timed_out))
        if self._listener is not None:
            self._listener.attempt_failed(failure, self._timed_out)
        if self._can_fall_back():
            return partial(self._next, failure)
        return partial(self._give_up, failure, self._timed_out)

    def _answered(self, response: IResponse, attempt: Attempt) -> Step | Deferred[Step]:
        self._settled()
        self._status = response.code
        if self._phase is Phase.LEAVING:
            response.deliverBody(Discard())
            return partial(self._end, self._left_as)
        if response.code in attempt.fallback_on and self._can_fall_back():
            log.info("falling back: {fields} answered {status}", fields=attempt.fields, status=response.code)
            if self._listener is not None:
                self._listener.attempt_failed(Failure(UpstreamStatus(response.code)), False)
            response.deliverBody(Discard())
            return partial(self._next, None)
        self._headers_at = self._clock.seconds()
        self._stop_heartbeat()
        if response.code >= 400 and self._listener is not None:
            self._listener.attempt_failed(Failure(UpstreamStatus(response.code)), False)
        if self._phase is Phase.HEARTBEATING and response.code >= 400:
            response.deliverBody(Discard())
            return partial(self._stream_failed, f"inference service answered HTTP {response.code}")
        return self._relay_body(response, attempt)

    def _relay_body(self, response: IResponse, attempt: Attempt) -> Deferred[Step]:
        """Relay C{response}'s body; the result fires with the end once the body is over."""
        request = self._request
        if self._phase is Phase.HEARTBEATING:
            is_sse = True  # heartbeats already promised an event stream
        else:
            request.setResponseCode(response.code, response.phrase or None)
            keep_length = self._keep_length and response.length is not UNKNOWN_LENGTH
            request.responseHeaders = client_response_headers(response.headers, response.length if keep_length else None)
            request.write(b"")  # the status line and headers go out now, before any body
            content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
            is_sse = content_type.lower().startswith(b"text/event-stream")
        self._move(Event.RELAY)
        self._observer = self._observe(is_sse) if self._observe is not None else None
        relayed: Deferred[Outcome] = Deferred()
        self._relay = ResponseRelay(
            request,
            self._clock,
            stream_error=self._stream_error if is_sse else None,
            idle_timeout=attempt.deadlines.idle,
            write_stall_timeout=attempt.deadlines.write_stall,
            done=relayed.callback,
            on_chunk=self._observer.feed if self._observer is not None else None,
            redactor=self._redactor(response.code, attempt),
        )
        response.deliverBody(self._relay)
        return relayed.addCallback(self._relayed)

    @staticmethod
    def _redactor(status: int, attempt: Attempt) -> Redactor | None:
        """Error bodies are where upstreams echo keys; successful ones are relayed untouched."""
        redactor = Redactor(attempt.secrets) if status >= 400 else None
        return redactor if redactor else None

    def _relayed(self, outcome: Outcome) -> Step:
        """The body is over: a cut the upstream caused is counted as its failure."""
        if outcome in _UPSTREAM_CUTS and self._listener is not None:
            self._listener.attempt_failed(Failure(StreamCut(outcome.value)), False)
        return partial(self._end, outcome)

    def _give_up(self, failure: Failure, timed_out: bool) -> None:
        if self._phase is Phase.HEARTBEATING:
            self._stream_failed("inference service unavailable")
        else:
            self._end(self._fail(failure, timed_out))

    def _stream_failed(self, message: str) -> None:
        """After heartbeats the status is already 200: report the failure in the stream."""
        if self._stream_error is not None:
            self._request.write(self._stream_error(message))
        self._request.finish()
        self._end(Outcome.UPSTREAM_ERROR)

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
            self._relay.cut(Outcome.TIMEOUT, "total timeout exceeded")
        elif self._pending is not None:
            self._timed_out = True
            self._pending.cancel()

    def _heartbeat(self) -> None:
        """Keep idle-sensitive middleboxes from cutting a long prefill: commit to 200 early."""
        request = self._request
        if self._phase is Phase.WAITING:
            request.setResponseCode(200)
            request.responseHeaders.setRawHeaders(b"content-type", [b"text/event-stream"])
            request.responseHeaders.setRawHeaders(b"cache-control", [b"no-cache"])
        self._move(Event.HEARTBEAT)
        request.write(HEARTBEAT_COMMENT)
        self._heartbeat_call = self._clock.callLater(self._heartbeat_interval, self._heartbeat)

    def _stop_heartbeat(self) -> None:
        self._cancel(self._heartbeat_call)
        self._heartbeat_call = None

    def _client_gone(self, reason: Failure) -> None:
        if self._phase is Phase.ENDED:
            return
        self._stop_heartbeat()
        self._move(Event.CLIENT_LEFT)
        if self._relay is not None:
            self._relay.stopProducing()
        elif self._pending is not None:
            self._pending.cancel()

    def drain_cut(self) -> bool:
        """The proxy stops while this stream still runs: its client is told so in the
        stream, which then ends with its chunked terminator (a relayed body that is
        not an event stream is aborted: truncated, it must not look complete).
        Before any answer, only a heartbeating stream can be ended so."""
        if self._phase is Phase.RELAYING and self._relay is not None:
            self._relay.cut(Outcome.DRAIN_CUT, DRAIN_MESSAGE)
            return True
        if self._phase is Phase.HEARTBEATING and self._stream_error is not None:
            self._left_as = Outcome.DRAIN_CUT
            self._attempts = []
            self._stop_heartbeat()
            self._request.write(self._stream_error(DRAIN_MESSAGE))
            self._request.finish()
            self._move(Event.CLIENT_LEFT)
            if self._pending is not None:
                self._pending.cancel()  # the call ends as one the client left: the record is written then
            return True
        return False

    def _end(self, detail: Outcome | str) -> None:
        """Write the one record of this exchange (C{detail}: how it ended, or the refusal's code)."""
        if self._phase is Phase.ENDED:
            return
        self._move(Event.END)
        self._stop_heartbeat()
        self._cancel(self._total_call)
        record = request_record(
            fields={**self._fields, **(self._current.fields if self._current is not None else {})},
            tried=self._tried,
            status=self._status if self._status is not None else self._request.code,
            detail=detail,
            started=self._started,
            headers_at=self._headers_at,
            ended=self._clock.seconds(),
            bytes_relayed=0 if self._relay is None else self._relay.bytes_relayed,
            observed=self._observer.summary() if self._observer is not None else {},
        )
        log_request(record)
        if self._observer is not None:
            self._observer.ended(record)
        if self._listener is not None:
            self._listener.ended(record)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


# Records of these outcomes are logged as warnings: the upstream failed (a
# stream it cut, an error it caused) or did not answer in time, or a stop cut the stream.
_WARN_OUTCOMES = frozenset({Outcome.UPSTREAM_ERROR.value, Outcome.TIMEOUT.value, Outcome.DRAIN_CUT.value})


def log_request(record: Mapping[str, Any]) -> None:
    """Log the one C{request} line of an exchange or of a refusal navtwist made itself."""
    level = LogLevel.warn if record.get("outcome") in _WARN_OUTCOMES else LogLevel.info
    log.emit(level, " ".join(["request"] + [f"{key}={{{key}}}" for key in record]), event="request", **record)


def refusal_record(fields: Mapping[str, Any], refusal: Refusal, started: float, ended: float) -> dict[str, Any]:
    """The record of a request navtwist refused itself, before any upstream was called."""
    return request_record(fields, 0, refusal.status, refusal.code, started, None, ended, 0, {})


def request_record(
    fields: Mapping[str, Any],
    tried: int,
    status: int,
    detail: Outcome | str,
    started: float,
    headers_at: float | None,
    ended: float,
    bytes_relayed: int,
    observed: Mapping[str, Any],
) -> dict[str, Any]:
    """The one record of an exchange, from its facts: C{fields} describe the call
    and its last candidate, C{detail} is how it ended (an L{Outcome}, or the
    refusal's code when no candidate answered), C{observed} is the body
    observer's summary."""
    summary = dict(observed)
    if detail is Outcome.CLIENT_GONE and summary.get("complete"):
        # SDKs close as soon as they see the final event, sometimes before
        # the chunked terminator reached them: nothing was lost.
        detail = Outcome.OK
    if detail is Outcome.OK and status >= 400:
        detail = Outcome.UPSTREAM_STATUS
    summary.pop("complete", None)
    text = detail.value if isinstance(detail, Outcome) else detail
    record: dict[str, Any] = {
        **fields,
        "candidates_tried": tried,
        "status": status,
        "outcome": outcome_class(text, status).value,
        "detail": text,
        "headers_ms": _ms(started, headers_at),
        "duration_ms": _ms(started, ended),
        "bytes": bytes_relayed,
    }
    if summary:
        first_token_at = summary.pop("first_token_at", None)
        record["ttft_ms"] = _ms(started, first_token_at) if status < 400 else None  # an error body is no token
        record.update(summary)
    return record


def _ms(start: float, at: float | None) -> float | None:
    return None if at is None else round((at - start) * 1000, 1)

