"""Router depth: model routes, candidates and fallback before the first byte,
deadlines, heartbeats, concurrency limits — all driven with a controlled clock."""
from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, TimeoutError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from navtwist.testing import FakeResponse, Harness, make_harness
from navtwist.config import parse_config
from navtwist.outcome import outcome_class


def _route(name: str, host: str, **extra: object) -> dict:
    return {"name": name, "endpoint": f"http://{host}/v1", "model": f"{host}-model",
            "protocols": ["openai_chat_completions", "openai_embeddings"], "api_key": f"key-{host}",
            "first_byte_timeout": 30, "idle_timeout": 20, "total_timeout": 50, **extra}


CONFIG = {
    "routes": [
        _route("fast", "a.test", models=["gpt-fast", "fast"]),
        _route("fast", "b.test", models=["gpt-fast"]),             # same name: a fallback candidate
        _route("smart", "c.test", models=["gpt-smart"], fallback=["default"], heartbeat=5, max_concurrent=1),
        _route("local", "d.test", models=["llama"], passthrough_model=True, model=None),
        _route("default", "e.test"),                                # no models: the protocol's default
        {**_route("claude", "f.test", provider_type="anthropic"), "protocols": ["anthropic_messages"]},
    ]
}
for r in CONFIG["routes"]:
    if r.get("model") is None:
        r.pop("model")


@pytest.fixture
def h() -> Harness:
    return make_harness(CONFIG)


def chat(model: str | None, stream: bool = True) -> bytes:
    doc: dict = {"stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        doc = {"model": model, **doc}
    return json.dumps(doc).encode()


def hosts(h: Harness) -> list[str]:
    return [call.uri.split(b"/")[2].decode() for call in h.agent.calls]


def upstream_models(h: Harness) -> list[str]:
    return [json.loads(call.body)["model"] for call in h.agent.calls]


def status_of(h: Harness) -> int:
    return int(h.output().split(b" ", 2)[1])


def body_json(h: Harness) -> dict:
    return json.loads(h.output().partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("model, host, upstream", [
    ("gpt-fast", "a.test", "a.test-model"),
    ("fast", "a.test", "a.test-model"),
    ("gpt-smart", "c.test", "c.test-model"),
    ("llama", "d.test", "llama"),                  # passthrough keeps the client's model
    ("anything-else", "e.test", "e.test-model"),   # the default route
    (None, "e.test", "e.test-model"),
])
def test_model_selects_the_route(h: Harness, model: str | None, host: str, upstream: str) -> None:
    h.send("POST", "/v1/chat/completions", chat(model))
    assert hosts(h) == [host] and upstream_models(h) == [upstream]


def test_unknown_model_without_default_route_is_404_naming_models() -> None:
    config = {"routes": [{k: v for k, v in r.items() if k != "fallback"} for r in CONFIG["routes"]
                         if r["name"] != "default"]}
    h = make_harness(config)
    h.send("POST", "/v1/chat/completions", chat("nope"))
    assert status_of(h) == 404
    message = body_json(h)["error"]["message"]
    assert "'nope'" in message and "gpt-fast" in message and "llama" in message
    assert h.agent.calls == []


def test_models_list_comes_from_config_in_both_shapes(h: Harness) -> None:
    h.send("GET", "/v1/models")
    ids = [m["id"] for m in body_json(h)["data"]]
    assert ids == ["gpt-fast", "fast", "gpt-smart", "llama", "e.test-model", "f.test-model"]
    other = make_harness(CONFIG)
    other.send("GET", "/v1/models/gpt-smart", anthropic_version="2023-06-01")
    assert body_json(other) == {"type": "model", "id": "gpt-smart", "display_name": "gpt-smart",
                                "created_at": "1970-01-01T00:00:00Z"}
    missing = make_harness(CONFIG)
    missing.send("GET", "/v1/models/ghost")
    assert status_of(missing) == 404


@pytest.mark.parametrize("failure", [ConnectionRefusedError(), TimeoutError(),
                                     ResponseFailed([Failure(ConnectionDone())])])
def test_failure_before_headers_falls_back_to_the_next_candidate(h: Harness, failure: Exception) -> None:
    h.send("POST", "/v1/chat/completions", chat("gpt-fast"))
    h.agent.calls[0].deferred.errback(Failure(failure))
    assert hosts(h) == ["a.test", "b.test"] and upstream_models(h) == ["a.test-model", "b.test-model"]
    assert h.agent.calls[1].headers.getRawHeaders(b"authorization") == [b"Bearer key-b.test"]
    assert h.output() == b""


def test_first_byte_timeout_falls_back(h: Harness) -> None:
    h.send("POST", "/v1/chat/completions", chat("gpt-fast"))
    h.clock.advance(30.1)
    assert h.agent.calls[0].cancelled and hosts(h) == ["a.test", "b.test"]
    h.clock.advance(30.1)
    assert status_of(h) == 504  # no candidate left


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_fallback_statuses_try_the_next_candidate(h: Harness, status: int) -> None:
    h.send("POST", "/v1/chat/completions", chat("gpt-fast"))
    busy = FakeResponse(status, headers={b"content-type": [b"application/json"]})
    h.agent.calls[0].deferred.callback(busy)
    assert busy.transport.stopped  # its body is discarded, its connection closed
    assert hosts(h) == ["a.test", "b.test"] and h.output() == b""


def test_last_candidate_status_is_passed_through(h: Harness) -> None:
    h.send("POST", "/v1/chat/completions", chat("gpt-fast"))
    h.agent.calls[0].deferred.callback(FakeResponse(503))
    last = FakeResponse(429, headers={b"content-type": [b"application/json"], b"retry-after": [b"7"]})
    h.agent.calls[1].deferred.callback(last)
    last.send(b'{"error":"slow down"}')
    last.end()
    assert status_of(h) == 429 and b"Retry-After: 7" in h.output()


def test_non_fallback_status_is_relayed_at_once(h: Harness) -> None:
    h.send("POST", "/v1/chat/completions", chat("gpt-fast"))
    h.agent.calls[0].deferred.callback(FakeResponse(401))
    assert status_of(h) == 401 and hosts(h) == ["a.test"]


def test_no_fallback_once_a_byte_has_gone_out(h: Harness) -> None:
    h.send("POST", "/v1/chat/completions", chat("gpt-fast"))
    response = FakeResponse()
    h.agent.calls[0].deferred.callback(response)
    response.send(b"data: {\"x\":1}\n\n")
    response.end(Failure(ResponseFailed([Failure(ConnectionDone())])))
    assert hosts(h) == ["a.test"]
    assert b"proxy_stream_error" in h.output()


def test_explicit_fallback_list_is_followed(h: Harness) -> None:
    h.send("POST", "/v1/chat/completions", chat("gpt-smart"))
    h.agent.calls[0].deferred.errback(Failure(ConnectionRefusedError()))
    assert hosts(h) == ["c.test", "e.test"]


def test_heartbeat_commits_early_and_keeps_the_connection_alive(h: Harness) -> None:
    h.send("POST", "/v1/chat/completions", chat("gpt-smart"))
    h.clock.advance(4.9)
    assert h.output() == b""
    h.clock.advance(0.2)
    out = h.output()
    assert out.startswith(b"HTTP/1.1 200 OK") and b"text/event-stream" in out and out.endswith(b": keep-alive\n\n\r\n")
    h.clock.advance(5)
    assert h.output().count(b": keep-alive") == 2
    response = FakeResponse()
    h.agent.calls[0].deferred.callback(response)
    response.send(b"data: 1\n\n")
    response.end()
    h.clock.advance(20)
    out = h.output()
    assert out.count(b": keep-alive") == 2 and out.endswith(b"data: 1\n\n\r\n0\r\n\r\n")


def test_after_heartbeats_an_upstream_error_is_an_sse_event(h: Harness) -> None:
    h.send("POST", "/v1/chat/completions", chat("gpt-smart"))
    h.clock.advance(5.1)
    h.agent.calls[0].deferred.callback(FakeResponse(503))  # would fall back, but bytes went out
    out = h.output()
    assert hosts(h) == ["c.test"]
    assert b"inference service answered HTTP 503" in out and out.endswith(b"0\r\n\r\n")


def test_heartbeat_is_only_for_streaming_requests(h: Harness) -> None:
    h.send("POST", "/v1/chat/completions", chat("gpt-smart", stream=False))
    h.clock.advance(10)
    assert h.output() == b""


def test_max_concurrent_sends_overflow_to_the_fallback_then_429() -> None:
    config = {"routes": [_route("smart", "c.test", models=["m"], max_concurrent=1)]}
    h = make_harness(config)
    h.send("POST", "/v1/chat/completions", chat("m"))
    second = h.another_connection()
    second.send("POST", "/v1/chat/completions", chat("m"))
    assert len(h.agent.calls) == 1
    assert status_of(second) == 429 and b"Retry-After: 1" in second.output()
    assert body_json(second)["error"]["code"] == "route_busy"


def test_finished_call_frees_its_slot() -> None:
    config = {"routes": [_route("smart", "c.test", models=["m"], max_concurrent=1)]}
    h = make_harness(config)
    h.send("POST", "/v1/embeddings", b'{"model":"m","input":"x"}')
    response = FakeResponse(headers={b"content-type": [b"application/json"]})
    h.agent.calls[0].deferred.callback(response)
    response.send(b"{}")
    response.end()
    h.send("POST", "/v1/embeddings", b'{"model":"m","input":"y"}')
    assert len(h.agent.calls) == 2


def _exchange_records(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("log_namespace") == "navtwist.exchange" and "duration_ms" in e]


def test_total_timeout_cuts_slow_non_streaming_calls(h: Harness, logs: list[dict]) -> None:
    h.send("POST", "/v1/embeddings", b'{"input":"x"}')
    response = FakeResponse(headers={b"content-type": [b"application/json"]})
    h.agent.calls[0].deferred.callback(response)
    for _ in range(4):  # keeps trickling: the idle timeout never fires
        h.clock.advance(12)
        response.send(b" ")
    assert not response.transport.stopped
    h.clock.advance(3)
    assert response.transport.stopped  # 51 s > total_timeout 50
    response.end(Failure(ResponseFailed([Failure(ConnectionDone())])))
    assert h.transport.aborted  # the client sees the body cut, not a short body passed off as complete
    [record] = _exchange_records(logs)
    assert record["outcome"] == "timeout"


def test_streams_are_never_cut_by_the_total_timeout(h: Harness, logs: list[dict]) -> None:
    h.send("POST", "/v1/chat/completions", chat(None))
    response = FakeResponse()
    h.agent.calls[0].deferred.callback(response)
    for _ in range(10):  # 150 s in all, past total_timeout 50; each gap within idle_timeout 20
        h.clock.advance(15)
        response.send(b"data: x\n\n")
    assert not response.transport.stopped
    response.end()
    assert h.output().endswith(b"data: x\n\n\r\n0\r\n\r\n")  # relayed to its very end
    [record] = _exchange_records(logs)
    assert record["outcome"] == "ok" and record["duration_ms"] == 150_000


def test_reload_takes_new_routes_for_new_requests_only(h: Harness) -> None:
    h.send("POST", "/v1/chat/completions", chat(None))
    first = FakeResponse()
    h.agent.calls[0].deferred.callback(first)
    h.router.replace_routes(parse_config({"routes": [_route("new", "z.test")]}, {}).routes)
    first.send(b"data: still here\n\n")
    first.end()
    assert h.output().endswith(b"data: still here\n\n\r\n0\r\n\r\n")
    h.send("POST", "/v1/chat/completions", chat(None))
    assert hosts(h) == ["e.test", "z.test"]


@pytest.mark.parametrize("detail, outcome", [
    ("ok", "ok"), ("client_gone", "client_gone"), ("client_stalled", "client_gone"),
    ("upstream_idle_timeout", "timeout"), ("timeout", "timeout"), ("upstream_timeout", "timeout"),
    ("upstream_error", "upstream_error"), ("upstream_unavailable", "upstream_error"), ("route_busy", "rejected"),
    ("upstream_status", "upstream_status"), ("policy_denied", "rejected"), ("upstream_unreachable", "upstream_error"),
])
def test_outcomes_are_classified(detail: str, outcome: str) -> None:
    assert outcome_class(detail) == outcome


def test_one_request_record_with_usage_and_latency(h: Harness, logs: list[dict]) -> None:
    h.send("POST", "/v1/chat/completions", chat("gpt-fast"))
    h.agent.calls[0].deferred.errback(Failure(ConnectionRefusedError()))
    h.clock.advance(0.25)
    response = FakeResponse()
    h.agent.calls[1].deferred.callback(response)
    h.clock.advance(0.5)
    response.send(b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n')
    h.clock.advance(0.25)
    response.send(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n')
    response.send(b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":22}}\n\ndata: [DONE]\n\n')
    h.clock.advance(1)
    response.end()
    [record] = _exchange_records(logs)
    assert {k: record[k] for k in ("protocol", "client_model", "route", "upstream_model", "candidates_tried",
                                   "status", "outcome", "headers_ms", "ttft_ms", "duration_ms",
                                   "input_tokens", "output_tokens")} == {
        "protocol": "openai_chat_completions", "client_model": "gpt-fast", "route": "fast",
        "upstream_model": "b.test-model", "candidates_tried": 2, "status": 200, "outcome": "ok",
        "headers_ms": 250.0, "ttft_ms": 1000.0, "duration_ms": 2000.0, "input_tokens": 11, "output_tokens": 22,
    }
    assert record["bytes"] > 0 and record["oversized_events"] == 0 and record["detail"] == "ok"
    assert "key-" not in repr(record) and "Hi" not in repr(record)


@pytest.mark.parametrize("tail, outcome", [(b"data: [DONE]\n\n", "ok"), (b"", "client_gone")])
def test_a_client_leaving_after_the_final_event_lost_nothing(h: Harness, tail: bytes, outcome: str, logs: list[dict]) -> None:
    h.send("POST", "/v1/chat/completions", chat(None))
    response = FakeResponse()
    h.agent.calls[0].deferred.callback(response)
    response.send(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n' + tail)
    h.disconnect()  # as SDKs do when they see [DONE], before the chunked terminator
    [record] = _exchange_records(logs)
    assert record["outcome"] == outcome
