"""Request rewriting rules of the router: URLs, headers, model, response headers."""
from __future__ import annotations

import json

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TimeoutError
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers

from navtwist.inference import errors
from navtwist.inference.providers import get_provider, openshell_url
from navtwist.upstream.relay import client_response_headers
from navtwist.inference.router import (
    body_for,
    classify_failure,
    parse_body,
    upstream_headers,
)


@pytest.mark.parametrize(
    "endpoint, uri, expected",
    [
        ("https://api.openai.com/v1", b"/v1/chat/completions", b"https://api.openai.com/v1/chat/completions"),
        ("https://api.openai.com/v1/", b"/v1/chat/completions", b"https://api.openai.com/v1/chat/completions"),
        ("https://api.deepinfra.com/v1/openai", b"/v1/chat/completions",
         b"https://api.deepinfra.com/v1/openai/chat/completions"),
        ("https://api.groq.com/openai/v1", b"/v1/chat/completions",
         b"https://api.groq.com/openai/v1/chat/completions"),
        ("https://proxy.example/api/v1/openai", b"/v1/chat/completions",
         b"https://proxy.example/api/v1/openai/v1/chat/completions"),
        ("https://api.anthropic.com", b"/v1/messages", b"https://api.anthropic.com/v1/messages"),
        ("http://127.0.0.1:8000/v1", b"/v1/models/meta%2Fllama", b"http://127.0.0.1:8000/v1/models/meta%2Fllama"),
        ("http://127.0.0.1:8000/v1", b"/v1/chat/completions?api-version=2024&x=1",
         b"http://127.0.0.1:8000/v1/chat/completions?api-version=2024&x=1"),
        ("mock://", b"/v1/chat/completions", b"mock:///v1/chat/completions"),
    ],
)
def test_upstream_url_follows_openshell_rules_and_keeps_query(endpoint: str, uri: bytes, expected: bytes) -> None:
    assert openshell_url(endpoint, uri) == expected
    assert get_provider("anthropic").url(endpoint, uri) == expected


def _client_headers(**extra: str) -> Headers:
    headers = Headers()
    base = {
        "content-type": "application/json",
        "accept": "text/event-stream",
        "accept-encoding": "identity",
        "user-agent": "OpenAI/Python 1.0",
        "authorization": "Bearer sk-client",
        "x-api-key": "sk-client-2",
        "cookie": "session=1",
        "host": "inference.local",
        "proxy-authorization": "Basic eA==",
        "connection": "keep-alive",
        "te": "trailers",
        "x-custom": "nope",
    }
    for name, value in {**base, **extra}.items():
        headers.setRawHeaders(name.encode(), [value.encode()])
    return headers


def _as_dict(headers: Headers) -> dict[bytes, list[bytes]]:
    return {name.lower(): values for name, values in headers.getAllRawHeaders()}


def test_openai_headers_allowlist_and_bearer_key() -> None:
    out = _as_dict(upstream_headers(_client_headers(**{"openai-organization": "org-1"}), get_provider("openai"), "sk-route"))
    assert out == {
        b"content-type": [b"application/json"],
        b"accept": [b"text/event-stream"],
        b"accept-encoding": [b"identity"],
        b"user-agent": [b"OpenAI/Python 1.0"],
        b"openai-organization": [b"org-1"],
        b"authorization": [b"Bearer sk-route"],
    }


def test_anthropic_headers_use_x_api_key_and_default_version() -> None:
    out = _as_dict(upstream_headers(_client_headers(**{"anthropic-beta": "tools-1"}), get_provider("anthropic"), "sk-ant"))
    assert out[b"x-api-key"] == [b"sk-ant"]
    assert out[b"anthropic-version"] == [b"2023-06-01"]
    assert out[b"anthropic-beta"] == [b"tools-1"]
    assert b"authorization" not in out


def test_anthropic_client_version_is_kept() -> None:
    out = _as_dict(upstream_headers(_client_headers(**{"anthropic-version": "2024-01-01"}), get_provider("anthropic"), "k"))
    assert out[b"anthropic-version"] == [b"2024-01-01"]


def test_no_key_means_no_auth_header() -> None:
    out = _as_dict(upstream_headers(_client_headers(), get_provider(None), ""))
    assert b"authorization" not in out and b"x-api-key" not in out


def _rewrite(body: bytes, model: str | None) -> bytes | None:
    return body_for(body, parse_body(body), model)


def test_rewrite_model_keeps_key_order() -> None:
    body = b'{"messages":[{"role":"user","content":"hi"}],"model":"client","stream":true,"z":1}'
    assert list(json.loads(_rewrite(body, "route"))) == ["messages", "model", "stream", "z"]
    assert json.loads(_rewrite(body, "route"))["model"] == "route"


def test_rewrite_model_adds_missing_model_and_leaves_non_objects() -> None:
    assert json.loads(_rewrite(b'{"input":"x"}', "m")) == {"input": "x", "model": "m"}
    assert _rewrite(b"[1, 2]", "m") == b"[1, 2]"
    assert _rewrite(b'{"input":"x"}', None) == b'{"input":"x"}'


def test_invalid_json_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_body(b"{not json")


def test_response_headers_drop_hop_by_hop_and_connection_listed() -> None:
    upstream = Headers(
        {
            b"content-type": [b"text/event-stream"],
            b"content-length": [b"64"],
            b"transfer-encoding": [b"chunked"],
            b"connection": [b"keep-alive, x-hop"],
            b"keep-alive": [b"timeout=5"],
            b"x-hop": [b"1"],
            b"x-request-id": [b"abc"],
            b"content-encoding": [b""],
        }
    )
    out = client_response_headers(upstream, None)
    assert {name.lower() for name, _ in out.getAllRawHeaders()} == {b"content-type", b"x-request-id"}
    out = client_response_headers(upstream, 11)
    assert out.getRawHeaders(b"content-length") == [b"11"]


def test_real_content_encoding_is_kept() -> None:
    out = client_response_headers(Headers({b"content-encoding": [b"br"]}), None)
    assert out.getRawHeaders(b"content-encoding") == [b"br"]


@pytest.mark.parametrize(
    "failure, timed_out, kind",
    [
        (ConnectionRefusedError(), False, errors.UPSTREAM_UNAVAILABLE),
        (DNSLookupError(), False, errors.UPSTREAM_UNAVAILABLE),
        (TimeoutError(), False, errors.UPSTREAM_UNAVAILABLE),
        (CancelledError(), True, errors.UPSTREAM_TIMEOUT),
        (ResponseNeverReceived([Failure(CancelledError())]), True, errors.UPSTREAM_TIMEOUT),
        (ResponseNeverReceived([]), False, errors.UPSTREAM_PROTOCOL),
    ],
)
def test_classify_failure(failure: Exception, timed_out: bool, kind: errors.ErrorKind) -> None:
    assert classify_failure(Failure(failure), timed_out) is kind
