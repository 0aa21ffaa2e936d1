"""Which upstream failures the metrics count, and under which bounded kind."""
from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from navtwist.outcome import Refusal
from navtwist.upstream.exchange import UpstreamStatus
from navtwist.inference.observe import MetricsListener, failure_kind


class Sink:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.records: list[dict] = []

    def upstream_error(self, kind: str) -> None:
        self.errors.append(kind)

    def request_finished(self, record: dict) -> None:
        self.records.append(record)


@pytest.mark.parametrize("error, timed_out, kind", [
    (ConnectionRefusedError(), False, "connect"),
    (CancelledError(), True, "timeout"),
    (UpstreamStatus(503), False, "status"),
    (ResponseNeverReceived([Failure(ValueError())]), False, "protocol"),
    (Refusal(502, "upstream_unreachable", "x"), False, "connect"),
    (KeyError(), False, "other"),
])
def test_failure_kinds(error: Exception, timed_out: bool, kind: str) -> None:
    assert failure_kind(Failure(error), timed_out) == kind


def test_proxy_refusals_are_not_upstream_errors() -> None:
    sink = Sink()
    listener = MetricsListener(sink)
    listener.attempt_failed(Failure(Refusal(403, "policy_denied", "x")), False)
    listener.attempt_failed(Failure(Refusal(504, "upstream_timeout", "x")), False)
    listener.ended({"outcome": "ok"})
    assert sink.errors == ["timeout"] and sink.records == [{"outcome": "ok"}]
