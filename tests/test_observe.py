"""Which upstream failures the metrics count, and under which bounded kind."""
from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TimeoutError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from OpenSSL.SSL import Error as TLSError

from navtwist.outcome import Refusal
from navtwist.upstream.failures import Cause, RouteBusy, UpstreamStatus, classify
from navtwist.inference.observe import MetricsListener


class Sink:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.records: list[dict] = []

    def upstream_error(self, kind: str) -> None:
        self.errors.append(kind)

    def request_finished(self, record: dict) -> None:
        self.records.append(record)


@pytest.mark.parametrize("error, timed_out, cause", [
    (ConnectionRefusedError(), False, Cause.CONNECT),
    (DNSLookupError(), False, Cause.CONNECT),
    (TimeoutError(), False, Cause.TIMEOUT),  # connecting timed out
    (CancelledError(), True, Cause.TIMEOUT),
    (ResponseNeverReceived([Failure(CancelledError())]), True, Cause.TIMEOUT),
    (ConnectionRefusedError(), True, Cause.TIMEOUT),  # our deadline, whatever error it surfaced as
    (UpstreamStatus(503), False, Cause.STATUS),
    (ResponseNeverReceived([Failure(ValueError())]), False, Cause.PROTOCOL),
    (ResponseNeverReceived([]), False, Cause.PROTOCOL),
    (ResponseFailed([Failure(TLSError())]), False, Cause.TLS),
    (Refusal(502, "upstream_unreachable", "x"), False, Cause.CONNECT),
    (Refusal(504, "upstream_timeout", "x"), False, Cause.TIMEOUT),
    (Refusal(403, "ssrf_denied", "x"), False, Cause.REFUSED),
    (RouteBusy(), False, Cause.BUSY),
    (KeyError(), False, Cause.OTHER),
])
def test_failure_causes(error: Exception, timed_out: bool, cause: Cause) -> None:
    assert classify(Failure(error), timed_out) is cause


def test_proxy_refusals_are_not_upstream_errors() -> None:
    sink = Sink()
    listener = MetricsListener(sink)
    listener.attempt_failed(Failure(Refusal(403, "policy_denied", "x")), False)
    listener.attempt_failed(Failure(Refusal(504, "upstream_timeout", "x")), False)
    listener.ended({"outcome": "ok"})
    assert sink.errors == ["timeout"] and sink.records == [{"outcome": "ok"}]
