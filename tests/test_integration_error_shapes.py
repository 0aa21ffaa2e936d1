"""Integration: errors in the shape each SDK parses, through a real navtwist over loopback.

The openai SDK sees a cut Responses stream as a failed response; the
anthropic SDK sees navtwist's own refusals as Anthropic errors (not "Failed
to authenticate"), reaches count_tokens, and never sees the route's key in
an upstream's error.
"""
from __future__ import annotations

import pytest

from upstream import ANTHROPIC_KEY, Json, Stream, sse, tokens

pytestmark = pytest.mark.integration
anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

MESSAGE = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def _responses_events(parts: list[str]) -> tuple[bytes, ...]:
    created = sse({"type": "response.created", "sequence_number": 0,
                   "response": {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}},
                  "response.created")
    deltas = [sse({"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "msg_1",
                   "output_index": 0, "content_index": 0, "delta": part}, "response.output_text.delta")
              for i, part in enumerate(parts)]
    return (created, *deltas)


def test_a_cut_responses_stream_ends_as_a_failed_response_in_the_openai_sdk(upstream, openai_client):
    upstream.script = Stream(events=_responses_events(tokens(5)), interval=0.05, die_after=3)

    types = [event.type for event in openai_client.responses.create(model="m", input="hi", stream=True)]

    assert types[:3] == ["response.created", "response.output_text.delta", "response.output_text.delta"]
    assert types[3:] == ["error", "response.failed"]


def test_a_path_not_served_is_an_anthropic_error_for_anthropic_clients(upstream, anthropic_client):
    with pytest.raises(anthropic.PermissionDeniedError) as raised:
        anthropic_client.get("/v1/files", cast_to=object)
    assert raised.value.status_code == 403
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "permission_error"
    assert upstream.exchanges == []


def test_count_tokens_reaches_the_anthropic_route(upstream, anthropic_client):
    upstream.script = Json(body={"input_tokens": 12})

    counted = anthropic_client.messages.count_tokens(model="m", messages=MESSAGE["messages"])

    assert counted.input_tokens == 12
    [exchange] = upstream.exchanges
    assert exchange.path == "/v1/messages/count_tokens"
    assert exchange.headers["x-api-key"] == ANTHROPIC_KEY


def test_an_upstream_error_echoing_the_key_reaches_the_sdk_redacted(upstream, anthropic_client):
    upstream.script = Json(status=401, body={"type": "error", "error": {
        "type": "authentication_error", "message": f"invalid x-api-key {ANTHROPIC_KEY}"}})

    with pytest.raises(anthropic.AuthenticationError) as raised:
        anthropic_client.messages.create(**MESSAGE)

    assert ANTHROPIC_KEY not in str(raised.value.body) and "*" * len(ANTHROPIC_KEY) in str(raised.value.body)
