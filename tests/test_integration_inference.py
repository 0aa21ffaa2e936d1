"""Integration: inference calls through the real twistd proxy to a real local upstream.

Clients are the openai and anthropic SDKs, httpx and curl.  Streams must reach
the client event by event as the upstream sends them, and the upstream must
see the route's key and model, never the client's.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from typing import Any

import pytest

from upstream import (
    ANTHROPIC_KEY,
    ANTHROPIC_MODEL,
    BASE,
    OPENAI_KEY,
    OPENAI_MODEL,
    Exchange,
    Json,
    Stream,
    anthropic_message_events,
    openai_chat_events,
    tokens,
)

pytestmark = pytest.mark.integration
# The SDKs are needed by the integration tests only: the fast tier runs without them.
openai = pytest.importorskip("openai")

CLIENT_SECRETS = ("sk-client-secret", "sk-ant-client")
INTERVAL = 0.15  # between upstream events in the timing tests
MAX_LAG = 0.4  # how long after the upstream sent an event the client may get it
MESSAGES = [{"role": "user", "content": "hi"}]


def assert_no_client_secret(exchange: Exchange) -> None:
    seen = json.dumps(exchange.headers) + exchange.body.decode("utf-8", "replace")
    for secret in CLIENT_SECRETS:
        assert secret not in seen


def assert_streamed_live(exchange: Exchange, arrivals: list[tuple[str, float]], parts: list[str]) -> None:
    """Each part reached the client promptly after the upstream sent it, so the
    parts arrived spread out over the stream's duration, not in one burst."""
    assert [text for text, _ in arrivals] == parts
    for text, arrived in arrivals:
        lag = arrived - exchange.sent_at(text)
        assert -0.05 < lag < MAX_LAG, f"{text!r} reached the client {lag:.3f} s after the upstream sent it"
    spread = arrivals[-1][1] - arrivals[0][1]
    assert spread > (len(parts) - 2) * INTERVAL, f"all parts arrived within {spread:.3f} s"


# --- streaming ---------------------------------------------------------------------------


def test_openai_sdk_chat_stream_arrives_token_by_token(upstream, openai_client, client_requests):
    parts = tokens(10)
    upstream.script = Stream(events=openai_chat_events(parts), interval=INTERVAL)

    start = time.monotonic()
    stream = openai_client.chat.completions.create(
        model="client-model", messages=MESSAGES, stream=True, temperature=0.5, max_tokens=50,
    )
    arrivals = [(chunk.choices[0].delta.content, time.monotonic()) for chunk in stream
                if chunk.choices and chunk.choices[0].delta.content]

    assert arrivals[0][1] - start < 0.6
    assert arrivals[-1][1] - start > 1.2
    assert "".join(text for text, _ in arrivals) == "".join(parts)
    exchange = upstream.only()
    assert_streamed_live(exchange, arrivals, parts)

    assert (exchange.method, exchange.path) == ("POST", "/v1/chat/completions")
    assert exchange.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert_no_client_secret(exchange)
    sent = json.loads(client_requests[-1].content)
    assert exchange.json() == {**sent, "model": OPENAI_MODEL}
    assert list(exchange.json()) == list(sent), "key order changed"


def test_anthropic_sdk_message_stream_arrives_token_by_token(upstream, anthropic_client, client_requests):
    parts = tokens(6)
    upstream.script = Stream(events=anthropic_message_events(parts), interval=INTERVAL)

    with anthropic_client.messages.stream(model="claude-client", max_tokens=64, messages=MESSAGES) as stream:
        arrivals = [(text, time.monotonic()) for text in stream.text_stream]
        message = stream.get_final_message()

    assert message.content[0].text == "".join(parts)
    assert message.stop_reason == "end_turn"
    exchange = upstream.only()
    assert_streamed_live(exchange, arrivals, parts)
    assert (exchange.method, exchange.path) == ("POST", "/v1/messages")
    assert exchange.headers["x-api-key"] == ANTHROPIC_KEY
    # The SDK's own version header is passed through (the default is tested below).
    assert exchange.headers["anthropic-version"] == client_requests[-1].headers["anthropic-version"]
    assert "authorization" not in exchange.headers
    assert_no_client_secret(exchange)
    assert exchange.json()["model"] == ANTHROPIC_MODEL


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("gzip", [False, True], ids=["identity", "gzip-upstream"])
def test_curl_stream_arrives_line_by_line(upstream, proxy, gzip):
    """With a gzip upstream, the proxy's decoder must not hold events back either."""
    parts = tokens(10)
    upstream.script = Stream(events=openai_chat_events(parts), interval=INTERVAL, gzip=gzip)
    body = json.dumps({"model": "m", "stream": True, "messages": MESSAGES})

    start = time.monotonic()
    with subprocess.Popen(
        ["curl", "-sS", "-N", "--max-time", "10", "--noproxy", "", "-x", proxy.url, "--cacert", str(proxy.ca_path),
         f"{BASE}/v1/chat/completions", "-H", "content-type: application/json", "-d", body],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as curl:
        lines = [(line, time.monotonic()) for line in curl.stdout if line.startswith(b"data: ")]
        assert curl.wait(5) == 0, curl.stderr.read()

    assert lines[-1][0].strip() == b"data: [DONE]"
    arrivals = [(json.loads(line[6:])["choices"][0]["delta"]["content"], at) for line, at in lines[:-1]]
    assert arrivals[0][1] - start < 0.6
    assert_streamed_live(upstream.only(), arrivals, parts)


# --- non-streaming -----------------------------------------------------------------------


def _document(kind: str, **fields: Any) -> dict[str, Any]:
    return {"object": kind, "created": 1700000000, "model": OPENAI_MODEL, **fields}


SDK_CALLS = [
    pytest.param(
        lambda c: c.chat.completions.create(model="client-model", messages=MESSAGES),
        _document("chat.completion", id="chatcmpl-1", choices=[{
            "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hello there"}}]),
        ("POST", "/v1/chat/completions"),
        lambda r: r.choices[0].message.content, "hello there", id="chat.completions",
    ),
    pytest.param(
        lambda c: c.completions.create(model="client-model", prompt="say"),
        _document("text_completion", id="cmpl-1", choices=[
            {"index": 0, "finish_reason": "stop", "text": "said", "logprobs": None}]),
        ("POST", "/v1/completions"),
        lambda r: r.choices[0].text, "said", id="completions",
    ),
    pytest.param(
        lambda c: c.embeddings.create(model="client-model", input="hi"),
        {"object": "list", "model": OPENAI_MODEL, "usage": {"prompt_tokens": 1, "total_tokens": 1},
         "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}]},
        ("POST", "/v1/embeddings"),
        lambda r: r.data[0].embedding, [0.25, -0.5], id="embeddings",
    ),
]


@pytest.mark.parametrize(("call", "document", "request_line", "extract", "expected"), SDK_CALLS)
def test_openai_sdk_call(upstream, openai_client, call, document, request_line, extract, expected):
    upstream.script = Json(body=document)

    assert extract(call(openai_client)) == expected

    exchange = upstream.only()
    assert (exchange.method, exchange.path) == request_line
    assert exchange.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert_no_client_secret(exchange)
    assert exchange.json()["model"] == OPENAI_MODEL


def test_models_are_listed_from_the_config(upstream, openai_client):
    assert [model.id for model in openai_client.models.list()] == [OPENAI_MODEL, ANTHROPIC_MODEL]
    assert openai_client.models.retrieve(OPENAI_MODEL).id == OPENAI_MODEL
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("no-such-model")
    assert upstream.exchanges == []


@pytest.mark.parametrize(("path", "framing"), [
    ("/v1/embeddings", "length"),
    ("/v1/chat/completions", "chunked"),  # a streaming protocol: relayed as it comes
])
def test_response_framing(upstream, http_client, path, framing):
    document = {"object": "list", "data": [{"id": "x" * 100}]}
    upstream.script = Json(body=document)

    response = http_client.post(f"{BASE}{path}", json={"model": "m"})

    assert response.status_code == 200
    assert response.json() == document
    if framing == "length":
        assert response.headers["content-length"] == str(len(json.dumps(document)))
        assert "transfer-encoding" not in response.headers
    else:
        assert response.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in response.headers


@pytest.mark.parametrize("absent", [
    "proxy-authenticate",  # hop-by-hop by definition
    pytest.param("x-hop", marks=pytest.mark.xfail(strict=True, reason=(
        "known limitation: Twisted's client keeps Connection out of response.headers, "
        "so the headers it nominates cannot be dropped"))),
    "content-encoding",  # treq's decoder invents an empty one; it must not reach the client
])
def test_response_headers(upstream, http_client, absent):
    upstream.script = Json(body={}, headers=(
        ("x-request-id", "req-7"), ("openai-processing-ms", "12"),
        ("connection", "keep-alive, x-hop"), ("x-hop", "1"), ("proxy-authenticate", "Basic"),
    ))

    response = http_client.post(f"{BASE}/v1/embeddings", json={"model": "m", "input": "x"})

    assert response.headers["x-request-id"] == "req-7"
    assert response.headers["openai-processing-ms"] == "12"
    assert "twisted" not in response.headers.get("server", "").lower()
    assert absent not in response.headers


# --- what the upstream sees ----------------------------------------------------------------


def test_request_is_rewritten_for_the_route(upstream, http_client):
    upstream.script = Json(body={"ok": True})
    body = b'{"zeta": 1, "model": "client-model", "alpha": {"b": 2, "a": 1}, "messages": [], "mid": null}'

    http_client.post(
        f"{BASE}/v1/chat/completions?api-version=2024",
        content=body,
        headers={"content-type": "application/json", "authorization": "Bearer sk-client-secret",
                 "x-api-key": "sk-client-secret", "cookie": "session=sk-client-secret",
                 "openai-organization": "org-1", "x-custom": "dropped"},
    )

    exchange = upstream.only()
    assert exchange.path == "/v1/chat/completions?api-version=2024"
    assert exchange.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert exchange.headers["openai-organization"] == "org-1"
    for dropped in ("x-api-key", "cookie", "x-custom"):
        assert dropped not in exchange.headers
    assert_no_client_secret(exchange)
    assert list(exchange.json()) == ["zeta", "model", "alpha", "messages", "mid"]
    assert exchange.json() == {"zeta": 1, "model": OPENAI_MODEL, "alpha": {"b": 2, "a": 1}, "messages": [],
                               "mid": None}


@pytest.mark.parametrize(("client_headers", "expected"), [
    pytest.param({}, {"anthropic-version": "2023-06-01"}, id="default-version"),
    pytest.param({"anthropic-version": "2024-10-22", "anthropic-beta": "prompt-caching-2024-07-31"},
                 {"anthropic-version": "2024-10-22", "anthropic-beta": "prompt-caching-2024-07-31"},
                 id="client-version-and-beta"),
])
def test_anthropic_headers(upstream, http_client, client_headers, expected):
    upstream.script = Json(body={"type": "message"})

    http_client.post(f"{BASE}/v1/messages", json={"model": "c", "max_tokens": 1, "messages": MESSAGES},
                     headers={"x-api-key": "sk-ant-client", "authorization": "Bearer sk-client-secret",
                              **client_headers})

    exchange = upstream.only()
    assert exchange.path == "/v1/messages"
    assert exchange.headers["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in exchange.headers
    assert {k: exchange.headers.get(k) for k in expected} == expected
    assert ("anthropic-beta" in exchange.headers) == ("anthropic-beta" in expected)
    assert_no_client_secret(exchange)
    assert exchange.json()["model"] == ANTHROPIC_MODEL


def test_keep_alive_reuses_one_tunnel(upstream, http_client):
    """Streams end cleanly (chunked terminator), so the next request can use the same tunnel."""
    upstream.script = Stream(events=openai_chat_events(tokens(3)))

    local_ports = set()
    for path in ["/v1/chat/completions", "/v1/embeddings", "/v1/completions"]:
        response = http_client.post(f"{BASE}{path}", json={"stream": True})
        assert response.status_code == 200
        assert response.text.endswith("data: [DONE]\n\n")
        local_ports.add(response.extensions["network_stream"].get_extra_info("client_addr")[1])

    assert len(upstream.wait_for(3)) == 3
    assert len(local_ports) == 1, "a request opened a new CONNECT tunnel"
