"""A stream still running at the drain deadline, driven deterministically: its
client is told in the stream that the proxy is shutting down, the chunked body
ends cleanly (no reset), and the request is logged as a drain cut.

The real inference path (twisted.web channel over a RecordingTransport, the
upstream a fake agent answered by hand), under the real listener and
DrainService on a MemoryReactorClock.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from conftest import RecordingMetrics
from navtwist.config import Limits, Timeouts
from navtwist.egress.dial import Egress
from navtwist.egress.policy import Policy
from navtwist.inference.errors import stream_error_event
from navtwist.inference.router import Extensions
from navtwist.interfaces import IDrainCut
from navtwist.listener import ProxyFactory, ProxyProtocol
from navtwist.outcome import CATEGORIES
from navtwist.service.drain import CUT_GRACE, POLL_INTERVAL, DrainService
from navtwist.testing import FakeResolver, FakeResponse, Harness, RecordingTransport, make_harness

ROUTES = {
    "routes": [
        {"name": "inference.local", "endpoint": "http://upstream.test/v1", "model": "route-model",
         "protocols": ["openai_chat_completions", "openai_responses"], "api_key": "sk-route-0123456789",
         "heartbeat": 5, "idle_timeout": 600},
        {"name": "inference.local", "endpoint": "http://upstream.test", "model": "claude-route",
         "protocols": ["anthropic_messages"], "api_key": "sk-ant-route-0123456789", "provider_type": "anthropic",
         "heartbeat": 5, "idle_timeout": 600},
    ]
}
STREAMS = {
    "openai_chat_completions": ("/v1/chat/completions", {"model": "m", "stream": True, "messages": []}),
    "openai_responses": ("/v1/responses", {"model": "m", "stream": True, "input": "hi"}),
    "anthropic_messages": ("/v1/messages", {"model": "m", "stream": True, "max_tokens": 8, "messages": []}),
}
CUT_EVENT = "response truncated: the proxy is shutting down"
DRAIN_TIMEOUT = 3.0  # before the routes' first heartbeat


@pytest.fixture
def metrics() -> RecordingMetrics:
    return RecordingMetrics()


@pytest.fixture
def h(metrics: RecordingMetrics) -> Harness:
    return make_harness(ROUTES, extensions=Extensions(metrics=metrics))


def _records(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("event") == "request"]


def _send(h: Harness, protocol: str, **document: Any) -> None:
    path, body = STREAMS[protocol]
    h.send("POST", path, json.dumps({**body, **document}).encode())


def _body(output: bytes) -> tuple[bytes, bool]:
    """The decoded chunked body after the head, and whether its terminating chunk arrived."""
    rest, body = output.partition(b"\r\n\r\n")[2], b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return body, rest == b"\r\n"
        body, rest = body + rest[:n], rest[n + 2:]
    return body, False


def _drain_cut(h: Harness) -> bool:
    [request] = h.channel.requests
    cut = request.getComponent(IDrainCut)
    assert cut is not None, "the exchange is not reachable from its request"
    return bool(cut.drain_cut())


# --- the exchange


@pytest.mark.parametrize("protocol", sorted(STREAMS))
def test_a_relayed_stream_ends_with_the_protocols_error_event_then_the_chunked_end(
        h: Harness, metrics: RecordingMetrics, logs: list[dict], protocol: str) -> None:
    _send(h, protocol)
    upstream = FakeResponse()
    h.agent.calls[0].deferred.callback(upstream)
    upstream.send(b'data: {"n": 1}\n\n')

    assert _drain_cut(h)

    body, terminated = _body(h.output())
    assert body == b'data: {"n": 1}\n\n' + stream_error_event(protocol, CUT_EVENT)
    assert terminated and not h.transport.aborted
    assert upstream.transport.stopped  # the upstream call is closed too
    [record] = _records(logs)
    assert (record["outcome"], record["detail"]) == ("drain_cut", "drain_cut")
    assert record["log_level"] is LogLevel.warn
    assert metrics.upstream_errors == []  # the proxy cut it, not the upstream


def test_a_heartbeating_stream_is_told_before_any_answer_and_its_call_cancelled(h: Harness, logs: list[dict]) -> None:
    _send(h, "openai_chat_completions")
    h.clock.advance(5.1)  # 200 and a keep-alive comment are out: the client has a stream

    assert _drain_cut(h)

    body, terminated = _body(h.output())
    assert body == b": keep-alive\n\n" + stream_error_event("openai_chat_completions", "the proxy is shutting down")
    assert terminated and not h.transport.aborted
    assert h.agent.calls[0].cancelled
    [record] = _records(logs)
    assert (record["outcome"], record["detail"]) == ("drain_cut", "drain_cut")
    assert {gate.active for gate in h.router._gates.values()} == {0}  # its slot is freed
    h.clock.advance(100)
    assert len(h.agent.calls) == 1 and len(_records(logs)) == 1


def test_a_relayed_body_that_is_not_an_event_stream_is_aborted_as_a_drain_cut(h: Harness, logs: list[dict]) -> None:
    _send(h, "openai_chat_completions", stream=False)
    upstream = FakeResponse(headers={b"content-type": [b"application/json"]})
    h.agent.calls[0].deferred.callback(upstream)
    upstream.send(b'{"choices": [')

    assert _drain_cut(h)

    assert h.transport.aborted  # a truncated JSON body must not look complete
    assert not _body(h.output())[1]
    [record] = _records(logs)
    assert record["detail"] == "drain_cut"


def test_a_call_not_answered_yet_is_left_to_the_caller(h: Harness, logs: list[dict]) -> None:
    _send(h, "openai_chat_completions")
    assert not _drain_cut(h)
    assert h.output() == b"" and not h.agent.calls[0].cancelled and _records(logs) == []


# --- the listener and the drain


class FakeCA:
    def server_options(self, hostname: str) -> str:
        return f"tls-options-for-{hostname}"


def _proxy(h: Harness) -> tuple[ProxyFactory, ProxyProtocol, RecordingTransport]:
    """A client connection to a listener whose inference.local site is C{h}'s, with a
    stream request sent through CONNECT (the TLS is recorded, the bytes stay plain)."""
    site = h.channel.site
    egress = Egress(h.clock, h.clock, FakeResolver({}), Policy.parse([]), connect_timeout=4)
    factory = ProxyFactory(FakeCA(), site, site, egress, Limits(), Timeouts(), h.clock,  # type: ignore[arg-type]
                           intercept_site=site)
    protocol = factory.buildProtocol(None)
    transport = RecordingTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n\r\n")
    protocol.handshakeCompleted()
    path, body = STREAMS["openai_chat_completions"]
    data = json.dumps(body).encode()
    protocol.dataReceived(b"POST %s HTTP/1.1\r\nHost: inference.local\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return factory, protocol, transport


def _stop(factory: ProxyFactory, h: Harness) -> list[None]:
    drain = DrainService(factory, h.clock, DRAIN_TIMEOUT)  # type: ignore[arg-type]
    drain.startService()
    done: list[None] = []
    drain.stopService().addCallback(done.append)
    return done


def test_drain_deadline_ends_a_running_stream_cleanly_then_the_connection(h: Harness, logs: list[dict]) -> None:
    factory, protocol, transport = _proxy(h)
    upstream = FakeResponse()
    h.agent.calls[0].deferred.callback(upstream)
    upstream.send(b'data: {"n": 1}\n\n')
    done = _stop(factory, h)

    h.clock.pump([POLL_INTERVAL] * int(DRAIN_TIMEOUT / POLL_INTERVAL - 1))
    assert not transport.disconnecting and protocol.busy()  # before the deadline, the stream runs on
    h.clock.pump([POLL_INTERVAL] * 2)

    body, terminated = _body(transport.value().partition(b"\r\n\r\n")[2])  # past the CONNECT's 200
    assert body == b'data: {"n": 1}\n\n' + stream_error_event("openai_chat_completions", CUT_EVENT)
    assert terminated and transport.disconnecting and not transport.aborted  # closed after it, not reset
    [record] = _records(logs)
    assert (record["outcome"], record["detail"]) == ("drain_cut", "drain_cut")
    protocol.connectionLost(Failure(ConnectionDone()))
    h.clock.advance(POLL_INTERVAL)
    assert done == [None] and not transport.aborted


def test_drain_aborts_what_cannot_be_cut_cleanly_at_the_deadline(h: Harness, logs: list[dict]) -> None:
    factory, protocol, transport = _proxy(h)  # the upstream has not answered: nothing to tell the client in
    _stop(factory, h)
    h.clock.pump([POLL_INTERVAL] * int(DRAIN_TIMEOUT / POLL_INTERVAL + 1))
    assert transport.aborted


def test_drain_aborts_a_cleanly_cut_connection_its_client_keeps_open(h: Harness) -> None:
    factory, protocol, transport = _proxy(h)
    upstream = FakeResponse()
    h.agent.calls[0].deferred.callback(upstream)
    _stop(factory, h)
    h.clock.pump([POLL_INTERVAL] * int(DRAIN_TIMEOUT / POLL_INTERVAL + 1))
    assert _body(transport.value().partition(b"\r\n\r\n")[2])[1] and not transport.aborted
    h.clock.pump([POLL_INTERVAL] * int(CUT_GRACE / POLL_INTERVAL + 1))
    assert transport.aborted  # the connection never went away: aborted a moment later


def test_the_outcomes_documented_are_the_metrics_label_set() -> None:
    """An operator reads the outcome values (drain_cut among them) in docs/logging.md."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "logging.md").read_text()
    sentence = text[text.index("A `request`'s `outcome` is one of"):].split("these are also")[0]
    documented = set(re.findall(r"`([a-z_]+)`(?! label)", sentence.split("is one of", 1)[1]))
    assert documented == CATEGORIES
