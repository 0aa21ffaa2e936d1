"""Watching inference responses as they pass: usage, plugin observers, metrics.

Everything here runs after a chunk has been written to the client, so none
of it can delay delivery.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from navtwist.outcome import Refusal
from navtwist.upstream.exchange import UpstreamStatus
from navtwist.inference.hooks import InferenceRequest, Watch
from navtwist.inference.usage import UsageMeter


class MetricsSink(Protocol):
    """The part of L{navtwist.service.metrics.Metrics} the inference path reports to."""

    def request_finished(self, record: dict[str, Any]) -> None: ...

    def stream_started(self) -> None: ...

    def stream_ended(self) -> None: ...

    def upstream_error(self, kind: str) -> None: ...


def failure_kind(failure: Failure, timed_out: bool) -> str:
    """A bounded name for why an upstream call failed."""
    if failure.check(Refusal):
        return {"upstream_unreachable": "connect", "upstream_timeout": "timeout"}.get(failure.value.code, "other")
    if timed_out or failure.check(TimeoutError, CancelledError):
        return "timeout"
    if failure.check(ConnectError, DNSLookupError):
        return "connect"
    if failure.check(UpstreamStatus):
        return "status"
    if failure.check(ResponseNeverReceived, ResponseFailed):
        reasons = getattr(failure.value, "reasons", [])
        if any(type(r.value).__module__.startswith("OpenSSL") for r in reasons):
            return "tls"
        return "protocol"
    return "other"


class MetricsListener:
    """Reports each exchange's failed candidates and its end to the metrics."""

    def __init__(self, metrics: MetricsSink) -> None:
        self._metrics = metrics

    def attempt_failed(self, failure: Failure, timed_out: bool) -> None:
        refusal = failure.value if failure.check(Refusal) else None
        if refusal is not None and refusal.status < 500:
            return  # the proxy refused the destination: no upstream was involved
        self._metrics.upstream_error(failure_kind(failure, timed_out))

    def ended(self, record: dict[str, Any]) -> None:
        self._metrics.request_finished(record)


class Observation:
    """One response's observers: its usage meter, plugin observers, the active-stream gauge."""

    def __init__(
        self,
        info: InferenceRequest,
        streaming: bool,
        clock: Callable[[], float],
        observers: Sequence[object],
        metrics: MetricsSink | None,
    ) -> None:
        self._meter = UsageMeter(info.protocol, streaming, clock)
        self._watch = Watch(observers, info) if observers else None
        self._metrics = metrics
        if metrics is not None:
            metrics.stream_started()
        if self._watch is not None:
            self._watch.started()

    def feed(self, chunk: bytes) -> None:
        self._meter.feed(chunk)
        if self._watch is not None:
            self._watch.chunk(chunk)

    def summary(self) -> dict[str, Any]:
        usage = self._meter.finish()
        return {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "first_token_at": usage.first_token_at,
            "complete": usage.complete,
        }

    def ended(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.stream_ended()
        if self._watch is not None:
            self._watch.ended(record)
