"""Request rewriting rules of the router: URLs, headers, model, response headers."""
from __future__ import annotations

import json

import pytest
from twisted.web.http_headers import Headers

from navtwist.inference import errors
from navtwist.inference.providers import get_provider, openshell_url
from navtwist.upstream.relay import client_response_headers
from navtwist.inference.router import (
    body_for,
    parse_body,
    upstream_headers,
)
from navtwist.inference.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT_COMPLETIONS
from navtwist.outcome import Refusal
from navtwist.upstream.failures import Cause


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


def test_response_headers_drop_hop_by_hop() -> None:
    upstream = Headers(
        {
            b"content-type": [b"text/event-stream"],
            b"content-length": [b"64"],
            b"transfer-encoding": [b"chunked"],
            b"keep-alive": [b"timeout=5"],
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
    "cause, refusal",
    [
        (Cause.BUSY, errors.ROUTE_BUSY),
        (Cause.CONNECT, errors.UPSTREAM_UNAVAILABLE),
        (Cause.TIMEOUT, errors.UPSTREAM_TIMEOUT),
        (Cause.TLS, errors.UPSTREAM_PROTOCOL),
        (Cause.PROTOCOL, errors.UPSTREAM_PROTOCOL),
        (Cause.OTHER, errors.UPSTREAM_PROTOCOL),
    ],
)
def test_inference_clients_are_told_per_cause(cause: Cause, refusal: Refusal) -> None:
    assert errors.upstream_refusal(cause) is refusal


@pytest.mark.parametrize(
    "refusal, openai_type, anthropic_type",
    [
        (errors.NOT_INFERENCE, "permission_error", "permission_error"),
        (errors.NO_ROUTE, "invalid_request_error", "invalid_request_error"),
        (errors.MODEL_NOT_FOUND, "not_found_error", "not_found_error"),
        (errors.ROUTE_BUSY, "rate_limit_error", "rate_limit_error"),
        (errors.UPSTREAM_UNAVAILABLE, "api_error", "overloaded_error"),
        (errors.UPSTREAM_TIMEOUT, "api_error", "api_error"),
        (Refusal(413, "request_too_large", "x"), "invalid_request_error", "request_too_large"),
        (Refusal(403, "model_blocked", "x"), "invalid_request_error", "invalid_request_error"),  # a hook's code
        (Refusal(500, "request_refused", "x"), "api_error", "api_error"),
    ],
)
def test_error_documents_in_each_sdk_shape(refusal: Refusal, openai_type: str, anthropic_type: str) -> None:
    assert errors.error_document(OPENAI_CHAT_COMPLETIONS, refusal) == {
        "error": {"message": refusal.message, "type": openai_type, "code": refusal.code}}
    assert errors.error_document(ANTHROPIC_MESSAGES, refusal) == {
        "type": "error", "error": {"type": anthropic_type, "message": refusal.message}}
