"""Integration: refusals and failures, as the client sees them and as the upstream does.

Every error a client gets is JSON in the shape its SDK parses; nothing that is
refused reaches the upstream; internal addresses never leak into messages.
"""
from __future__ import annotations

import json
import ssl

import httpx
import pytest

from upstream import BASE, Json, Stream, anthropic_message_events, openai_chat_events, routes_config, tokens

pytestmark = pytest.mark.integration
# The SDKs are needed by the integration tests only: the fast tier runs without them.
anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/files"),
    ("POST", "/v2/chat/completions"),
    ("GET", "/"),
    ("GET", "/v1/chat/completions"),  # right path, wrong method
    ("DELETE", "/v1/models/x"),
])
def test_paths_not_served_are_refused(upstream, http_client, method, path):
    response = http_client.request(method, f"{BASE}{path}")

    assert response.status_code == 403
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "policy_denied"
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    assert response.headers["server"] == "navtwist"
    assert upstream.exchanges == []


@pytest.mark.parametrize(("path", "content", "error_field"), [
    ("/v1/chat/completions", b"{not json", ("code", "invalid_json")),  # OpenAI's error shape
    ("/v1/messages", b"\xff\xfe", ("type", "invalid_request_error")),  # Anthropic's
])
def test_body_that_is_not_json_is_refused(upstream, http_client, path, content, error_field):
    response = http_client.post(f"{BASE}{path}", content=content, headers={"content-type": "application/json"})

    assert response.status_code == 400
    key, value = error_field
    assert response.json()["error"][key] == value
    assert upstream.exchanges == []


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", id="other-host"),
    pytest.param(b"CONNECT inference.local:80 HTTP/1.1\r\nHost: inference.local:80\r\n\r\n", id="other-port"),
    pytest.param(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n", id="ip-address"),
    pytest.param(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", id="plain-http"),
])
def test_proxy_denies_other_destinations(upstream, proxy_request, request_bytes):
    status, head, body = proxy_request(request_bytes)

    assert status == 403, head
    assert json.loads(body)["error"] == "policy_denied"
    assert upstream.exchanges == []


def test_connect_to_other_host_is_denied_for_httpx(upstream, http_client):
    with pytest.raises(httpx.ProxyError, match="403"):
        http_client.get("https://example.com/")
    assert upstream.exchanges == []


def test_leaf_is_signed_by_our_ca_only(upstream, make_client, open_tunnel):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        make_client(verify=ssl.create_default_context()).get(f"{BASE}/v1/models")
    assert upstream.exchanges == []

    # Trusting our CA instead, the same leaf verifies, and it names inference.local.
    peer = open_tunnel().sock.getpeercert()
    assert ("DNS", "inference.local") in peer["subjectAltName"]


@pytest.mark.parametrize(("status", "error_class"), [
    (401, openai.AuthenticationError),
    (429, openai.RateLimitError),
    (503, openai.InternalServerError),
])
def test_upstream_error_status_passes_through(upstream, openai_client, status, error_class):
    error = {"message": f"upstream says {status}", "type": "invalid_request_error", "code": f"code_{status}"}
    upstream.script = Json(status=status, body={"error": error}, headers=(("retry-after", "7"),))

    with pytest.raises(error_class) as caught:
        openai_client.chat.completions.create(**CHAT)

    assert caught.value.status_code == status
    assert caught.value.body == error
    assert caught.value.response.headers["retry-after"] == "7"
    assert len(upstream.exchanges) == 1  # no retry by the proxy


def assert_no_address(text: str, port: int) -> None:
    assert "127.0.0.1" not in text
    assert str(port) not in text


class TestUpstreamUnreachable:
    """The route's endpoint is a closed port on 127.0.0.1."""

    @pytest.fixture
    def proxy(self, start_proxy, closed_port):
        return start_proxy(routes_config(f"http://127.0.0.1:{closed_port}"))

    @pytest.mark.parametrize(("sdk_client", "call", "error_class"), [
        pytest.param("openai_client", lambda c: c.chat.completions.create(**CHAT), openai.APIStatusError,
                     id="openai"),
        pytest.param("anthropic_client", lambda c: c.messages.create(**MESSAGE), anthropic.APIStatusError,
                     id="anthropic"),
    ])
    def test_sdk_gets_503(self, request, closed_port, sdk_client, call, error_class):
        with pytest.raises(error_class) as caught:
            call(request.getfixturevalue(sdk_client))

        assert caught.value.status_code == 503
        assert_no_address(caught.value.message, closed_port)
        assert_no_address(caught.value.response.text, closed_port)

    @pytest.mark.parametrize(("path", "body", "shape"), [
        ("/v1/chat/completions", CHAT, "openai"),
        ("/v1/embeddings", {"model": "m", "input": "x"}, "openai"),
        ("/v1/messages", MESSAGE, "anthropic"),
    ])
    def test_error_shape(self, http_client, closed_port, path, body, shape):
        response = http_client.post(f"{BASE}{path}", json=body)

        assert response.status_code == 503
        assert_no_address(response.text, closed_port)
        document = response.json()
        if shape == "anthropic":
            assert document["type"] == "error"
            assert set(document["error"]) == {"type", "message"}
        else:
            assert set(document["error"]) == {"message", "type", "code"}


@pytest.mark.parametrize(("path", "body", "events", "error_event"), [
    pytest.param("/v1/chat/completions", CHAT, openai_chat_events(tokens(5)),
                 '"type": "proxy_stream_error"', id="openai"),
    pytest.param("/v1/messages", MESSAGE, anthropic_message_events(tokens(5)),
                 'event: error\ndata: {"type": "error"', id="anthropic"),
])
def test_upstream_dying_mid_stream_ends_with_an_error_event(upstream, http_client, path, body, events,
                                                            error_event):
    upstream.script = Stream(events=events, interval=0.05, die_after=3)

    with http_client.stream("POST", f"{BASE}{path}", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())  # ends cleanly: no RemoteProtocolError

    received = [event + "\n\n" for event in text.split("\n\n") if event]
    assert received[:3] == [event.decode() for event in events[:3]]
    assert len(received) == 4, received
    assert error_event in received[3]


def test_upstream_dying_mid_stream_raises_in_openai_sdk(upstream, openai_client):
    upstream.script = Stream(events=openai_chat_events(tokens(5)), interval=0.05, die_after=3)

    received = []
    with pytest.raises(openai.APIError, match="truncated"):
        for chunk in openai_client.chat.completions.create(**CHAT, stream=True):
            received.append(chunk.choices[0].delta.content)

    assert received == tokens(3)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/chat/completions"])
def test_upstream_dying_mid_json_is_not_relayed_as_complete(upstream, http_client, path):
    upstream.script = Json(body={"object": "list", "data": [{"embedding": [0.5] * 200}]}, die_after=300)

    with pytest.raises(httpx.RemoteProtocolError):
        http_client.post(f"{BASE}{path}", json={"model": "m", "input": "x"})
