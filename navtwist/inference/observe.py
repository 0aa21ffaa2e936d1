"""Watching inference responses as they pass: usage, plugin observers, metrics.

Everything here runs after a chunk has been written to the client, so none
of it can delay delivery.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from twisted.python.failure import Failure

from navtwist.upstream.failures import classify
from navtwist.inference.hooks import InferenceRequest, ObserverFanout
from navtwist.inference.usage import UsageMeter
from navtwist.interfaces import IStreamObserver


class MetricsSink(Protocol):
    """The part of L{navtwist.service.metrics.Metrics} the inference path reports to."""

    def request_finished(self, record: dict[str, Any]) -> None: ...

    def stream_started(self) -> None: ...

    def stream_ended(self) -> None: ...

    def upstream_error(self, kind: str) -> None: ...


class MetricsListener:
    """Reports each exchange's failed candidates and its end to the metrics."""

    def __init__(self, metrics: MetricsSink) -> None:
        self._metrics = metrics

    def attempt_failed(self, failure: Failure, timed_out: bool) -> None:
        cause = classify(failure, timed_out)
        if cause.is_upstream_error:  # not when the proxy refused the destination itself
            self._metrics.upstream_error(cause.value)

    def ended(self, record: dict[str, Any]) -> None:
        self._metrics.request_finished(record)


class Observation:
    """One response's observers: its usage meter, plugin observers, the active-stream gauge."""

    def __init__(
        self,
        info: InferenceRequest,
        streaming: bool,
        clock: Callable[[], float],
        observers: Sequence[IStreamObserver],
        metrics: MetricsSink | None,
    ) -> None:
        self._meter = UsageMeter(info.protocol, streaming, clock)
        self._observers = ObserverFanout(observers, info) if observers else None
        self._metrics = metrics
        if metrics is not None:
            metrics.stream_started()
        if self._observers is not None:
            self._observers.started()

    def feed(self, chunk: bytes) -> None:
        self._meter.feed(chunk)
        if self._observers is not None:
            self._observers.chunk(chunk)

    def summary(self) -> dict[str, Any]:
        usage = self._meter.finish()
        return {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "first_token_at": usage.first_token_at,
            "oversized_events": usage.oversized_events,  # events too long to read: their usage is missed
            "complete": usage.complete,
        }

    def ended(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.stream_ended()
        if self._observers is not None:
            self._observers.ended(record)
