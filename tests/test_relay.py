"""The inference data path, driven deterministically: channel → dispatcher → router → relay.

A real twisted.web HTTPChannel runs over a StringTransport, the upstream is a
fake agent answered by hand, and a MemoryReactorClock drives every timeout.
"""
from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from navtwist.testing import FakeResponse, Harness, make_harness

ROUTES = {
    "routes": [
        {
            "name": "inference.local",
            "endpoint": "http://upstream.test/v1",
            "model": "route-model",
            "protocols": ["openai_chat_completions", "openai_embeddings", "model_discovery"],
            "api_key": "sk-route",
            "first_byte_timeout": 30,
            "idle_timeout": 20,
        },
        {
            "name": "inference.local",
            "endpoint": "http://upstream.test",
            "model": "claude",
            "protocols": ["anthropic_messages"],
            "api_key": "sk-ant",
            "provider_type": "anthropic",
        },
    ]
}
WRITE_STALL = 15.0
CHAT = json.dumps({"model": "client-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
def harness() -> Harness:
    return make_harness(ROUTES, write_stall=WRITE_STALL, max_body_bytes=1024)


def _stream(h: Harness, response: FakeResponse | None = None) -> FakeResponse:
    h.send("POST", "/v1/chat/completions", CHAT)
    response = response or FakeResponse()
    h.agent.calls[0].deferred.callback(response)
    return response


def test_request_rewritten_for_upstream(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions?x=1", CHAT, Cookie="a=b", OpenAI_Organization="org")
    [call] = harness.agent.calls
    assert call.method == b"POST"
    assert call.uri == b"http://upstream.test/v1/chat/completions?x=1"
    assert call.headers.getRawHeaders(b"authorization") == [b"Bearer sk-route"]
    assert call.headers.getRawHeaders(b"openai-organization") == [b"org"]
    assert not call.headers.hasHeader(b"cookie")
    sent = json.loads(call.body)
    assert sent["model"] == "route-model" and list(sent) == ["model", "stream", "messages"]
    assert harness.output() == b""  # nothing answered before the upstream does


def test_headers_go_out_before_any_body_and_chunks_are_not_coalesced(harness: Harness) -> None:
    response = _stream(harness)
    out = harness.output()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Transfer-Encoding: chunked" in out and out.endswith(b"\r\n\r\n")
    events = [b"data: {\"n\":%d}\n\n" % i for i in range(3)]
    for i, event in enumerate(events):
        before = len(harness.output())
        response.send(event)
        # each upstream chunk is written at once, as its own HTTP chunk
        assert harness.output()[before:] == b"%x\r\n%s\r\n" % (len(event), event)
    response.end()
    assert harness.output().endswith(b"0\r\n\r\n")


def test_upstream_content_length_is_dropped_for_streams(harness: Harness) -> None:
    _stream(harness, FakeResponse(headers={b"content-type": [b"text/event-stream"], b"content-length": [b"64"]}, length=64))
    assert b"content-length" not in harness.output().lower()


def test_non_streaming_response_keeps_content_length(harness: Harness) -> None:
    harness.send("POST", "/v1/embeddings", b'{"input":"x"}')
    body = b'{"data":[]}'
    response = FakeResponse(headers={b"content-type": [b"application/json"], b"content-length": [b"11"]}, length=11)
    harness.agent.calls[0].deferred.callback(response)
    response.send(body)
    response.end()
    out = harness.output()
    assert b"Content-Length: 11" in out and b"chunked" not in out.lower()
    assert out.endswith(body)


def test_slow_client_pauses_upstream_and_resume_continues(harness: Harness) -> None:
    response = _stream(harness)
    harness.channel.pauseProducing()  # what the transport does when its buffer is full
    assert response.transport.paused
    harness.channel.resumeProducing()
    assert not response.transport.paused
    response.send(b"data: 1\n\n")
    assert harness.output().endswith(b"data: 1\n\n\r\n")


def test_paused_stream_is_not_cut_by_upstream_idle_timeout(harness: Harness) -> None:
    response = _stream(harness)
    harness.channel.pauseProducing()
    harness.clock.advance(WRITE_STALL - 1)  # longer than nothing, shorter than the stall limit
    harness.channel.resumeProducing()
    harness.clock.advance(19)  # idle_timeout is 20: restarted at resume
    assert not response.transport.stopped


def test_client_that_reads_nothing_is_dropped_and_upstream_stopped(harness: Harness) -> None:
    response = _stream(harness)
    harness.channel.pauseProducing()
    harness.clock.advance(WRITE_STALL + 0.1)
    assert harness.transport.aborted  # a client that reads nothing would wait out a polite close
    harness.disconnect()
    assert response.transport.stopped


def test_client_disconnect_mid_stream_stops_upstream(harness: Harness) -> None:
    response = _stream(harness)
    response.send(b"data: 1\n\n")
    harness.disconnect()
    assert response.transport.stopped
    assert not harness.clock.getDelayedCalls()


def test_client_disconnect_before_upstream_headers_cancels_the_call(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions", CHAT)
    harness.disconnect()
    assert harness.agent.calls[0].cancelled
    assert not harness.clock.getDelayedCalls()


def test_first_byte_timeout_answers_504(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions", CHAT)
    harness.clock.advance(29)
    assert harness.output() == b""
    harness.clock.advance(1.5)
    assert harness.agent.calls[0].cancelled
    status, doc = harness.response_json()
    assert status == 504 and doc["error"]["code"] == "upstream_timeout"


def test_long_silence_between_chunks_ends_stream_with_error_event(harness: Harness) -> None:
    response = _stream(harness)
    for _ in range(5):  # a stream that keeps moving is never cut
        harness.clock.advance(19)
        response.send(b"data: x\n\n")
    assert not response.transport.stopped
    harness.clock.advance(20.1)
    assert response.transport.stopped
    out = harness.output()
    assert b"response truncated: upstream sent nothing for 20 s" in out
    assert b'"type": "proxy_stream_error"' in out and out.endswith(b"0\r\n\r\n")


def test_upstream_death_mid_event_is_reported_after_a_separator(harness: Harness) -> None:
    response = _stream(harness)
    response.send(b'data: {"partial')
    response.end(Failure(ResponseFailed([Failure(ConnectionDone())])))
    body = harness.output()
    assert b'data: {"partial' in body
    assert b"\n\ndata: {\"error\"" in body and b"upstream connection lost" in body
    assert body.endswith(b"0\r\n\r\n")


def test_anthropic_stream_error_uses_anthropic_event(harness: Harness) -> None:
    harness.send("POST", "/v1/messages", b'{"model":"x","stream":true,"max_tokens":5,"messages":[]}')
    response = FakeResponse()
    harness.agent.calls[0].deferred.callback(response)
    response.end(Failure(ResponseFailed([Failure(ConnectionDone())])))
    assert b"event: error\ndata: {\"type\": \"error\"" in harness.output()


def test_non_sse_body_cut_short_aborts_the_client_connection(harness: Harness) -> None:
    harness.send("POST", "/v1/embeddings", b'{"input":"x"}')
    response = FakeResponse(headers={b"content-type": [b"application/json"]})
    harness.agent.calls[0].deferred.callback(response)
    response.send(b'{"data":')
    response.end(Failure(ResponseFailed([Failure(ConnectionDone())])))
    assert not harness.output().endswith(b"0\r\n\r\n")
    assert harness.transport.aborted  # a clean close would pass the cut body off as complete


def test_unreachable_upstream_is_503_without_internal_details(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions", CHAT)
    harness.agent.calls[0].deferred.errback(Failure(ConnectionRefusedError("10.1.2.3:8443")))
    status, doc = harness.response_json()
    assert status == 503
    assert doc == {"error": {"message": "inference service unavailable: connection refused", "type": "api_error",
                             "code": "upstream_unavailable"}}
    assert b"10.1.2.3" not in harness.output() and b"upstream.test" not in harness.output()


def test_anthropic_errors_use_anthropic_shape(harness: Harness) -> None:
    harness.send("POST", "/v1/messages", b'{"model":"x"}')
    harness.agent.calls[0].deferred.errback(Failure(ConnectionRefusedError()))
    status, doc = harness.response_json()
    assert status == 503 and doc["type"] == "error" and doc["error"]["type"] == "overloaded_error"


def test_upstream_error_status_passes_through(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions", CHAT)
    response = FakeResponse(429, headers={b"content-type": [b"application/json"], b"retry-after": [b"3"]})
    harness.agent.calls[0].deferred.callback(response)
    response.send(b'{"error":{"message":"slow down"}}')
    response.end()
    out = harness.output()
    assert out.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 3" in out and b"slow down" in out


@pytest.mark.parametrize("method, path", [("GET", "/v1/files"), ("POST", "/v2/chat/completions"), ("GET", "/"),
                                          ("DELETE", "/v1/models/x"), ("GET", "/v1/chat/completions")])
def test_non_inference_paths_are_403_and_never_reach_upstream(harness: Harness, method: str, path: str) -> None:
    harness.send(method, path)
    status, doc = harness.response_json()
    assert status == 403 and doc["error"]["code"] == "policy_denied"
    assert harness.agent.calls == []


def test_protocol_without_route_is_400(harness: Harness) -> None:
    harness.send("POST", "/v1/responses", b'{"input":"x"}')
    status, doc = harness.response_json()
    assert status == 400 and doc["error"]["code"] == "no_compatible_route"
    assert harness.agent.calls == []


def test_invalid_json_body_is_400(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions", b"{nope")
    status, doc = harness.response_json()
    assert status == 400 and doc["error"]["code"] == "invalid_json"
    assert harness.agent.calls == []


def test_body_over_cap_is_413_and_closes(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions", b"x" * 2000)
    status, doc = harness.response_json()
    assert status == 413 and doc["error"]["code"] == "request_too_large"
    assert harness.transport.disconnecting and harness.agent.calls == []


def test_chunked_body_over_cap_is_413(harness: Harness) -> None:
    harness.channel.dataReceived(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"400\r\n" + b"a" * 1024 + b"\r\n" + b"10\r\n" + b"b" * 16 + b"\r\n0\r\n\r\n"
    )
    status, _ = harness.response_json()
    assert status == 413 and harness.agent.calls == []


def test_keep_alive_serves_requests_in_order(harness: Harness) -> None:
    harness.send("POST", "/v1/embeddings", b'{"input":"a"}')
    harness.send("POST", "/v1/embeddings", b'{"input":"b"}')  # pipelined behind the first
    assert len(harness.agent.calls) == 1
    first = FakeResponse(headers={b"content-type": [b"application/json"]})
    harness.agent.calls[0].deferred.callback(first)
    first.send(b"[1]")
    first.end()
    assert len(harness.agent.calls) == 2 and json.loads(harness.agent.calls[1].body)["input"] == "b"


def test_models_are_listed_from_the_config_not_an_upstream(harness: Harness) -> None:
    harness.send("GET", "/v1/models")
    status, doc = harness.response_json()
    assert status == 200 and [m["id"] for m in doc["data"]] == ["route-model", "claude"]
    assert harness.agent.calls == []
