"""Failures visible in logs and metrics, driven deterministically.

Upstream error statuses, cut streams, navtwist's own refusals, failed client
handshakes and upstream TLS and timeout failures each leave a log line an
operator can read and a count, and name their cause.
"""
from __future__ import annotations

import json
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, ConnectionLost, TimeoutError
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from conftest import RecordingMetrics
from navtwist.inference.router import Extensions
from navtwist.outcome import Refusal
from navtwist.testing import FakeResponse, Harness, make_harness
from navtwist.upstream.failures import Cause, classify, describe

ROUTES = {
    "routes": [
        {"name": "inference.local", "endpoint": "http://upstream.test/v1", "model": "route-model",
         "protocols": ["openai_chat_completions"], "api_key": "sk-route-0123456789", "idle_timeout": 20,
         "first_byte_timeout": 30},
    ]
}
CHAT = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


class RefusingHook:
    name = "refusing"

    def before_upstream(self, request: object) -> Refusal:
        return Refusal(451, "hook_refused", "refused by a hook")


@pytest.fixture
def metrics() -> RecordingMetrics:
    return RecordingMetrics()


@pytest.fixture
def harness(metrics: RecordingMetrics) -> Harness:
    return make_harness(ROUTES, max_body_bytes=1024, extensions=Extensions(metrics=metrics))


def _requests(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("log_namespace") == "navtwist.exchange" and "outcome" in e]


# --- upstream error statuses


def test_upstream_error_status_is_its_own_outcome_counted_and_no_first_token(
        harness: Harness, metrics: RecordingMetrics, logs: list[dict]) -> None:
    harness.send("POST", "/v1/chat/completions", CHAT)
    response = FakeResponse(500)  # an error answered as an event stream whose event looks like content
    harness.clock.advance(0.5)
    harness.agent.calls[0].deferred.callback(response)
    response.send(b'data: {"choices":[{"delta":{"content":"overloaded"}}]}\n\n')
    response.end()
    [record] = metrics.records
    assert (record["status"], record["outcome"], record["detail"]) == (500, "upstream_status", "upstream_status")
    assert record["ttft_ms"] is None
    assert metrics.upstream_errors == ["status"]


# --- streams cut by the upstream


@pytest.mark.parametrize("cut", ["death", "idle"])
def test_stream_cut_by_the_upstream_is_a_warning_and_counted(
        harness: Harness, metrics: RecordingMetrics, logs: list[dict], cut: str) -> None:
    harness.send("POST", "/v1/chat/completions", CHAT)
    response = FakeResponse()
    harness.agent.calls[0].deferred.callback(response)
    response.send(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
    if cut == "death":
        response.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    else:
        harness.clock.advance(21)
    [line] = _requests(logs)
    assert line["log_level"] is LogLevel.warn
    assert metrics.upstream_errors == ["stream_cut"]
    assert metrics.records[0]["outcome"] in ("upstream_error", "timeout")


def test_a_complete_stream_is_logged_at_info_and_not_counted_as_an_error(
        harness: Harness, metrics: RecordingMetrics, logs: list[dict]) -> None:
    harness.send("POST", "/v1/chat/completions", CHAT)
    response = FakeResponse()
    harness.agent.calls[0].deferred.callback(response)
    response.send(b"data: [DONE]\n\n")
    response.end()
    [line] = _requests(logs)
    assert line["log_level"] is LogLevel.info and line["outcome"] == "ok"
    assert metrics.upstream_errors == []


# --- refusals navtwist makes itself


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    ("GET", "/v1/files", b"", 403, "policy_denied"),
    ("POST", "/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("POST", "/v1/chat/completions", b"[]", 400, "invalid_json"),
    ("POST", "/v1/embeddings", b"{}", 400, "no_compatible_route"),
    ("GET", "/v1/models/nope", b"", 404, "model_not_found"),
    ("POST", "/v1/chat/completions", b"x" * 2000, 413, "request_too_large"),
])
def test_each_refusal_is_one_request_line_and_counted(
        harness: Harness, metrics: RecordingMetrics, logs: list[dict], method: str, path: str, body: bytes,
        status: int, code: str) -> None:
    harness.send(method, path, body)
    assert harness.output().startswith(b"HTTP/1.1 %d " % status)
    [line] = _requests(logs)
    assert (line["status"], line["detail"], line["outcome"]) == (status, code, "rejected")
    [record] = metrics.records
    assert (record["status"], record["outcome"]) == (status, "rejected")
    assert harness.agent.calls == []


def test_a_hook_refusal_is_one_request_line_and_counted(metrics: RecordingMetrics, logs: list[dict]) -> None:
    harness = make_harness(ROUTES, extensions=Extensions(hooks=[RefusingHook()], metrics=metrics))
    harness.send("POST", "/v1/chat/completions", CHAT)
    assert harness.output().startswith(b"HTTP/1.1 451 ")
    [line] = _requests(logs)
    assert (line["detail"], line["outcome"]) == ("hook_refused", "rejected")
    assert [r["status"] for r in metrics.records] == [451]


def test_a_policy_denial_of_a_forwarded_request_is_worded_as_a_decision(logs: list[dict]) -> None:
    from test_forward import Client

    client = Client()
    client.send("http://elsewhere.example/")
    assert client.refusal()[0] == 403
    texts = [formatEvent(e) for e in logs]
    assert not any("upstream call failed" in text for text in texts), texts
    assert any(text.startswith("destination refused (policy_denied)") and "elsewhere.example" in text
               for text in texts), texts
    [line] = _requests(logs)
    assert (line["detail"], line["outcome"]) == ("policy_denied", "rejected")


# --- upstream TLS failures and timeouts name their cause


def _never(*reasons: BaseException) -> Failure:
    return Failure(ResponseNeverReceived([Failure(reason) for reason in reasons]))


@pytest.mark.parametrize(("failure", "timed_out", "cause", "text"), [
    (_never(SSL.Error([("SSL routines", "", "certificate verify failed")])), False, Cause.TLS,
     "TLS handshake failed: certificate verify failed"),
    (Failure(ConnectingCancelledError(IPv4Address("TCP", "10.0.0.1", 443))), True, Cause.TIMEOUT,
     "timed out connecting"),
    (Failure(TimeoutError()), False, Cause.TIMEOUT, "timed out connecting"),
    (_never(CancelledError()), True, Cause.TIMEOUT, "timed out waiting for response headers"),
    (_never(ConnectionDone()), False, Cause.PROTOCOL, "connection closed before response headers"),
])
def test_upstream_failures_name_their_cause(failure: Failure, timed_out: bool, cause: Cause, text: str) -> None:
    assert classify(failure, timed_out) is cause
    assert describe(failure, timed_out) == text
    assert "10.0.0.1" not in describe(failure, timed_out)


def test_an_upstream_tls_failure_is_named_to_the_client_and_in_the_log(harness: Harness, logs: list[dict]) -> None:
    harness.send("POST", "/v1/chat/completions", json.dumps({"model": "m"}).encode())
    harness.agent.calls[0].deferred.errback(_never(SSL.Error([("SSL routines", "", "certificate verify failed")])))
    status, doc = harness.response_json()
    assert status == 502
    assert doc["error"]["message"] == "inference service sent an invalid response: " \
                                      "TLS handshake failed: certificate verify failed"
    failed = [formatEvent(e) for e in logs if formatEvent(e).startswith("upstream call failed")]
    assert len(failed) == 1 and "certificate verify failed" in failed[0]
    assert "ResponseNeverReceived" not in failed[0]


def test_waiting_for_headers_too_long_is_named(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions", json.dumps({"model": "m"}).encode())
    harness.clock.advance(31)
    status, doc = harness.response_json()
    assert status == 504 and doc["error"]["message"].endswith("timed out waiting for response headers")


# --- clients whose TLS handshake with navtwist fails


class _TLSConnection:
    def __init__(self, sni: bytes | None) -> None:
        self._sni = sni

    def get_servername(self) -> bytes | None:
        return self._sni


def _handshake_warnings(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events
            if e.get("log_level") is LogLevel.warn and "TLS handshake with a client" in formatEvent(e)]


def _failed_handshake(factory: Any, sni: bytes | None, reason: Failure) -> None:
    from test_listener_intercept import _connect

    protocol, transport = _connect(factory, b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n\r\n")
    transport.getHandle = lambda: _TLSConnection(sni)
    protocol.connectionLost(reason)


UNKNOWN_CA = Failure(SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")]))


def test_a_failed_client_handshake_is_one_warning_with_the_sni_and_reason(logs: list[dict]) -> None:
    from test_listener_intercept import _factory

    factory, _ = _factory()
    _failed_handshake(factory, b"inference.local", UNKNOWN_CA)
    [line] = _handshake_warnings(logs)
    assert "inference.local" in line and "tlsv1 alert unknown ca" in line and "CA" in line


def test_a_completed_handshake_is_not_reported(logs: list[dict]) -> None:
    from test_listener_intercept import _connect, _factory

    factory, _ = _factory()
    protocol, _ = _connect(factory, b"CONNECT inference.local:443 HTTP/1.1\r\n\r\n")
    protocol.handshakeCompleted()
    protocol.connectionLost(Failure(ConnectionDone()))
    assert _handshake_warnings(logs) == []


def test_repeated_handshake_failures_are_rate_limited_into_a_count(logs: list[dict]) -> None:
    from test_listener_intercept import _factory

    factory, parts = _factory()
    clock: MemoryReactorClock = parts["clock"]
    for _ in range(50):
        _failed_handshake(factory, b"inference.local", UNKNOWN_CA)
        clock.advance(0.1)
    assert len(_handshake_warnings(logs)) == 1  # the first, at once
    clock.advance(10)
    lines = _handshake_warnings(logs)
    assert len(lines) == 2 and "49 more" in lines[1]
    clock.advance(60)
    assert len(_handshake_warnings(logs)) == 2  # nothing more to say
    _failed_handshake(factory, None, Failure(ConnectionDone()))
    lines = _handshake_warnings(logs)
    assert len(lines) == 3 and "inference.local (no SNI)" in lines[2] and "closed the connection" in lines[2]


def test_a_handshake_that_times_out_is_reported(logs: list[dict]) -> None:
    from test_listener_intercept import _connect, _factory

    factory, parts = _factory()
    _connect(factory, b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n\r\n")
    parts["clock"].advance(factory.timeouts.tls_handshake + 1)
    [line] = _handshake_warnings(logs)
    assert "handshake timed out" in line
