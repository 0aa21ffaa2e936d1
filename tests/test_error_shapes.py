"""Errors in the shape each client parses, driven deterministically over the real inference path.

A real twisted.web channel over a StringTransport, the upstream a fake agent
answered by hand (navtwist.testing): Responses streams cut mid-way end with
events Responses clients read, Anthropic clients get Anthropic's error shape
for every refusal, count_tokens reaches Anthropic routes unstreamed, bodies
that are JSON but no object are refused, upstream error bodies never carry
the route's key.
"""
from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from navtwist.testing import FakeResponse, Harness, make_harness

OPENAI_KEY = "sk-route-0123456789"
ANTHROPIC_KEY = "sk-ant-route-0123456789"
ROUTES = {
    "routes": [
        {
            "name": "inference.local",
            "endpoint": "http://upstream.test/v1",
            "model": "route-model",
            "protocols": ["openai_chat_completions", "openai_responses", "model_discovery"],
            "api_key": OPENAI_KEY,
        },
        {
            "name": "inference.local",
            "endpoint": "http://upstream.test",
            "model": "claude-route",
            "protocols": ["anthropic_messages"],
            "api_key": ANTHROPIC_KEY,
            "provider_type": "anthropic",
            "heartbeat": 2,
        },
    ]
}
RESPONSES = json.dumps({"model": "m", "stream": True, "input": "hi"}).encode()
MESSAGE = json.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
def harness() -> Harness:
    return make_harness(ROUTES, max_body_bytes=1024)


def _sse_events(body: bytes) -> list[tuple[str | None, dict]]:
    """The (event, data) pairs of a chunked SSE body."""
    decoded, rest = b"", body
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        decoded, rest = decoded + rest[:n], rest[n + 2:]
        if n == 0:
            break
    events = []
    for block in decoded.split(b"\n\n"):
        name, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = json.loads(line[6:])
        if data is not None:
            events.append((name, data))
    return events


def _is_anthropic_error(doc: dict) -> bool:
    return doc.get("type") == "error" and isinstance(doc["error"]["type"], str) and "code" not in doc["error"]


# --- Responses streams cut mid-way


def test_responses_stream_cut_ends_with_error_and_response_failed(harness: Harness) -> None:
    harness.send("POST", "/v1/responses", RESPONSES)
    response = FakeResponse()
    harness.agent.calls[0].deferred.callback(response)
    response.send(b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n')
    response.end(Failure(ResponseFailed([Failure(ConnectionDone())])))

    events = _sse_events(harness.output().partition(b"\r\n\r\n")[2])
    assert [name for name, _ in events] == ["response.created", "error", "response.failed"]
    _, error = events[1]
    assert error["type"] == "error" and error["code"] == "server_error" and "truncated" in error["message"]
    _, failed = events[2]
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed"
    assert "truncated" in failed["response"]["error"]["message"]
    assert harness.output().endswith(b"0\r\n\r\n")


def test_chat_stream_cut_keeps_the_chat_completions_shape(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions", json.dumps({"model": "m", "stream": True}).encode())
    response = FakeResponse()
    harness.agent.calls[0].deferred.callback(response)
    response.end(Failure(ResponseFailed([Failure(ConnectionDone())])))
    [(name, doc)] = _sse_events(harness.output().partition(b"\r\n\r\n")[2])
    assert name is None and doc["error"]["code"] == "stream_truncated"


# --- Anthropic clients get Anthropic's shape for every refusal


@pytest.mark.parametrize(("method", "path", "headers", "status"), [
    ("GET", "/v1/files", {"anthropic_version": "2023-06-01"}, 403),  # Claude Code probing a path not served
    ("POST", "/v1/messages/batches", {}, 403),  # an Anthropic path not served
    ("POST", "/v1/chat/completions", {"anthropic_version": "2023-06-01"}, 400),  # body "{" below: invalid JSON
    ("GET", "/v1/models/nope", {"anthropic_version": "2023-06-01"}, 404),
])
def test_anthropic_clients_get_anthropic_errors(harness: Harness, method: str, path: str, headers: dict,
                                                status: int) -> None:
    harness.send(method, path, b"{" if method == "POST" else b"", **headers)
    got, doc = harness.response_json()
    assert got == status and _is_anthropic_error(doc), doc
    assert harness.agent.calls == []


def test_unknown_path_without_anthropic_signs_stays_openai_shaped(harness: Harness) -> None:
    harness.send("GET", "/v1/files")
    status, doc = harness.response_json()
    assert status == 403 and doc["error"]["code"] == "policy_denied"


def test_too_large_body_with_anthropic_version_is_anthropic_shaped(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions", b"x" * 2048, anthropic_version="2023-06-01")
    status, doc = harness.response_json()
    assert status == 413 and doc == {"type": "error", "error": {"type": "request_too_large",
                                                                 "message": "request body exceeds the proxy's limit"}}


# --- count_tokens


def test_count_tokens_goes_to_the_anthropic_route_unstreamed_with_its_model(harness: Harness) -> None:
    body = json.dumps({"model": "claude-x", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    harness.send("POST", "/v1/messages/count_tokens", body.encode(), anthropic_version="2023-06-01")
    [call] = harness.agent.calls
    assert call.uri == b"http://upstream.test/v1/messages/count_tokens"
    assert json.loads(call.body)["model"] == "claude-route"
    assert call.headers.getRawHeaders(b"x-api-key") == [ANTHROPIC_KEY.encode()]
    harness.clock.advance(10)  # a streamed call would get heartbeats here; this one waits for its answer
    assert harness.output() == b""
    response = FakeResponse(200, {b"content-type": [b"application/json"]}, length=19)
    call.deferred.callback(response)
    response.send(b'{"input_tokens":12}')
    response.end()
    assert harness.output().startswith(b"HTTP/1.1 200 ") and b'{"input_tokens":12}' in harness.output()


# --- bodies that are JSON but not an object


@pytest.mark.parametrize("body", [b"[]", b"0", b'"x"', b"null", b"true"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_json_that_is_not_an_object_is_refused_before_any_upstream(harness: Harness, path: str,
                                                                   body: bytes) -> None:
    harness.send("POST", path, body)
    status, doc = harness.response_json()
    assert status == 400
    assert harness.agent.calls == []
    message = doc["error"]["message"]
    assert "JSON object" in message


# --- the route's key is never echoed back


@pytest.mark.parametrize("chunks", [
    pytest.param([f'{{"error":{{"message":"invalid key {OPENAI_KEY}"}}}}'.encode()], id="one-chunk"),
    pytest.param([b'{"error":{"message":"invalid key sk-route-01', b"23456789 and ", b"sk-route-0123456789", b'"}}'],
                 id="split-across-chunks"),
])
def test_upstream_error_body_has_the_route_key_masked(harness: Harness, chunks: list[bytes]) -> None:
    harness.send("POST", "/v1/chat/completions", json.dumps({"model": "m"}).encode())
    response = FakeResponse(401, {b"content-type": [b"application/json"]})
    harness.agent.calls[0].deferred.callback(response)
    for chunk in chunks:
        response.send(chunk)
    response.end()
    out = harness.output()
    assert out.startswith(b"HTTP/1.1 401 ")
    assert OPENAI_KEY.encode() not in out and b"sk-route-01" not in out
    assert b"*" * len(OPENAI_KEY) in out


def test_successful_bodies_are_not_rewritten(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions", json.dumps({"model": "m", "stream": True}).encode())
    response = FakeResponse()
    harness.agent.calls[0].deferred.callback(response)
    response.send(b"data: {}\n\n")  # relayed at once, not held back
    assert harness.output().endswith(b"data: {}\n\n\r\n")
