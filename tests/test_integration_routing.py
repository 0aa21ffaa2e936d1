"""Integration: routing depth through the real twistd proxy to real local upstreams.

Model aliases and passthrough, fallback to a second candidate for every
failure before the first byte (and never after it), which deadlines apply to
streams and which to plain calls, heartbeats, concurrency limits, usage in
the request log, and config reloads while streams are in flight.

Clients are the openai and anthropic SDKs (max_retries=0) and httpx.
Everything runs on 127.0.0.1; every wait is bounded.
"""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from routing_helpers import (  # noqa: F401  (fixtures are used by name)
    anthropic_through,
    httpx_through,
    make_upstream,
    not_tls,
    openai_events_with_usage,
    openai_through,
    request_records,
    wait_for_records,
    wait_until,
)
from upstream import (
    ANTHROPIC_KEY,
    BASE,
    OPENAI_KEY,
    Json,
    Stream,
    anthropic_message_events,
    openai_chat_events,
    routes_config,
    tokens,
)

pytestmark = pytest.mark.integration
# The SDKs are needed by the integration tests only: the fast tier runs without them.
openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "stream": True, "messages": MESSAGES}
TIMEOUTS = {"head_read": 30, "tls_handshake": 10, "keepalive_idle": 60, "write_stall": 60}


def route(name: str, base_url: str, model: str | None, **options: Any) -> dict[str, Any]:
    """An OpenAI-style route to an upstream at C{base_url}."""
    entry = {"name": name, "endpoint": f"{base_url}/v1", "protocols": ["openai_chat_completions", "model_discovery"],
             "api_key": OPENAI_KEY, "provider_type": "openai", **options}
    if model is not None:
        entry["model"] = model
    return entry


def config(*routes: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"routes": list(routes), "timeouts": TIMEOUTS, **top}


def stream_text(client: openai.OpenAI, model: str = "client-model", **options: Any) -> str:
    """Stream a chat completion with the SDK; the concatenated content."""
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **options)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def chat_document(text: str, model: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


# --- model aliases ------------------------------------------------------------------------


def test_model_aliases_passthrough_and_unknown_models(start_proxy, make_upstream):
    fast, local = make_upstream(), make_upstream()
    fast.script = Json(body=chat_document("from fast", "route-x"))
    local.script = Json(body=chat_document("from local", "llama"))
    proxy = start_proxy(config(
        route("fast", fast.url, "route-x", models=["gpt-fast"]),
        route("local", local.url, None, models=["llama"], passthrough_model=True),
    ))

    with openai_through(proxy) as client:
        assert [m.id for m in client.models.list()] == ["gpt-fast", "llama"]
        assert fast.exchanges == [] and local.exchanges == [], "the model list asked an upstream"

        answer = client.chat.completions.create(model="gpt-fast", messages=MESSAGES)
        assert answer.choices[0].message.content == "from fast"
        assert fast.only().json()["model"] == "route-x"

        answer = client.chat.completions.create(model="llama", messages=MESSAGES)
        assert answer.choices[0].message.content == "from local"
        assert local.only().json()["model"] == "llama"

        with pytest.raises(openai.NotFoundError) as raised:
            client.chat.completions.create(model="gpt-unknown", messages=MESSAGES)
    assert raised.value.status_code == 404
    message = raised.value.body["message"]
    assert "gpt-unknown" in message and "gpt-fast" in message and "llama" in message, message
    assert len(fast.exchanges) == 1 and len(local.exchanges) == 1

    records = wait_for_records(proxy, 3)
    assert [(r["route"], r["client_model"], r["upstream_model"]) for r in records[:2]] == [
        ("fast", "gpt-fast", "route-x"), ("local", "llama", "llama")]
    refused = records[2]  # the unknown model: navtwist's own refusal has its record too
    assert (refused["status"], refused["detail"], refused["outcome"], refused["client_model"]) == (
        "404", "model_not_found", "rejected", "gpt-unknown")


# --- fallback before the first byte ----------------------------------------------------------

PRIMARY_MODEL = "primary-model"
SECONDARY_MODEL = "secondary-model"
FALLBACK_PARTS = ["from ", "the ", "secondary"]


@pytest.mark.parametrize("failure", ["refused", "hang", "429", "503", "tls"])
def test_fallback_before_the_first_byte(start_proxy, make_upstream, closed_port, not_tls, failure):
    primary, secondary = make_upstream(), make_upstream()
    secondary.script = Stream(events=openai_chat_events(FALLBACK_PARTS, model=SECONDARY_MODEL))
    primary_endpoint = primary.url
    if failure == "refused":
        primary_endpoint = f"http://127.0.0.1:{closed_port}"
    elif failure == "tls":
        primary_endpoint = f"https://127.0.0.1:{not_tls.port}"
    elif failure == "hang":
        primary.script = Json(body={"late": True}, headers_delay=5)
    else:
        primary.script = Json(status=int(failure), body={"error": {"message": "busy", "type": "x"}})
    proxy = start_proxy(config(
        route("pool", primary_endpoint, PRIMARY_MODEL, first_byte_timeout=0.5),
        route("pool", secondary.url, SECONDARY_MODEL),
    ))

    start = time.monotonic()
    with openai_through(proxy) as client:
        assert stream_text(client) == "".join(FALLBACK_PARTS)
    elapsed = time.monotonic() - start

    assert secondary.only().json()["model"] == SECONDARY_MODEL
    [record] = wait_for_records(proxy, 1)
    if failure in ("refused", "tls"):
        assert float(record["headers_ms"]) < 450, "a fast failure waited for the first-byte deadline"
    if failure == "refused":
        assert primary.exchanges == []
    elif failure == "tls":
        assert not_tls.accepted >= 1 and primary.exchanges == []
    else:
        exchange = primary.only()
        assert exchange.json()["model"] == PRIMARY_MODEL
        if failure == "hang":
            assert 0.45 < elapsed < 3, elapsed
            exchange.wait(3)
            assert exchange.peer_closed_at is not None and not exchange.completed, "the hung call was not cancelled"
    assert record["candidates_tried"] == "2", record
    assert (record["route"], record["upstream_model"]) == ("pool", SECONDARY_MODEL), record
    # (Not the outcome: the SDK closes the response at [DONE], sometimes before the
    # chunked terminator has passed the proxy, which then logs client_gone.)
    assert record["status"] == "200", record


@pytest.mark.parametrize(("failure", "status", "code"), [
    ("hang", 504, "upstream_timeout"),
    ("503", 503, None),  # the last candidate's own answer is relayed
])
def test_when_every_candidate_fails_the_client_gets_the_last_failure(start_proxy, make_upstream, failure, status,
                                                                      code):
    primary, secondary = make_upstream(), make_upstream()
    if failure == "hang":
        script = Json(body={"late": True}, headers_delay=5)
    else:
        script = Json(status=503, body={"error": {"message": "overloaded", "type": "server_error"}})
    primary.script = secondary.script = script
    proxy = start_proxy(config(
        route("pool", primary.url, PRIMARY_MODEL, first_byte_timeout=0.5),
        route("pool", secondary.url, SECONDARY_MODEL, first_byte_timeout=0.5),
    ))

    start = time.monotonic()
    with openai_through(proxy) as client:
        with pytest.raises(openai.APIStatusError) as raised:
            stream_text(client)
    elapsed = time.monotonic() - start

    assert raised.value.status_code == status
    if code is not None:
        assert raised.value.code == code
        assert 0.9 < elapsed < 2.5, f"two 0.5 s first-byte deadlines took {elapsed:.2f} s"
    else:
        assert raised.value.message.endswith("overloaded") or "overloaded" in str(raised.value.body)
    assert primary.only().json()["model"] == PRIMARY_MODEL
    assert secondary.only().json()["model"] == SECONDARY_MODEL
    [record] = wait_for_records(proxy, 1)
    assert (record["candidates_tried"], record["upstream_model"], record["status"]) == (
        "2", SECONDARY_MODEL, str(status)), record


def test_no_fallback_once_a_heartbeat_has_committed_the_stream(start_proxy, make_upstream):
    """Documented: after a heartbeat, later failures arrive as SSE error events, with no fallback."""
    primary, secondary = make_upstream(), make_upstream()
    primary.script = Json(body={"late": True}, headers_delay=5)
    secondary.script = Stream(events=openai_chat_events(["never"], model=SECONDARY_MODEL))
    proxy = start_proxy(config(
        route("pool", primary.url, PRIMARY_MODEL, first_byte_timeout=0.7, heartbeat=0.2),
        route("pool", secondary.url, SECONDARY_MODEL),
    ))

    with httpx_through(proxy) as http:
        with http.stream("POST", f"{BASE}/v1/chat/completions", json=CHAT) as response:
            text = "".join(response.iter_text())

    assert response.status_code == 200
    assert text.startswith(": keep-alive\n\n")
    events = [event for event in text.split("\n\n") if event and not event.startswith(":")]
    assert len(events) == 1 and "proxy_stream_error" in events[0], text
    assert secondary.exchanges == []
    [record] = wait_for_records(proxy, 1)
    assert (record["candidates_tried"], record["outcome"]) == ("1", "upstream_error"), record


def test_fallback_list_names_the_next_route(start_proxy, make_upstream):
    primary, backup = make_upstream(), make_upstream()
    primary.script = Json(status=503, body={})
    backup.script = Stream(events=openai_chat_events(FALLBACK_PARTS, model="backup-model"))
    proxy = start_proxy(config(
        route("primary", primary.url, PRIMARY_MODEL, fallback=["backup"]),
        route("backup", backup.url, "backup-model", models=["backup-only"]),
    ))

    with openai_through(proxy) as client:
        assert stream_text(client) == "".join(FALLBACK_PARTS)

    assert primary.only().json()["model"] == PRIMARY_MODEL
    assert backup.only().json()["model"] == "backup-model"
    [record] = wait_for_records(proxy, 1)
    assert (record["candidates_tried"], record["route"], record["upstream_model"]) == ("2", "backup", "backup-model")


# --- never after the first byte -----------------------------------------------------------------


class TestNoFallbackAfterTheFirstByte:
    @pytest.fixture
    def upstreams(self, make_upstream):
        return make_upstream(), make_upstream()

    @pytest.fixture
    def proxy(self, start_proxy, upstreams):
        primary, secondary = upstreams
        secondary.script = Stream(events=openai_chat_events(["never"], model=SECONDARY_MODEL))
        return start_proxy(config(
            route("pool", primary.url, PRIMARY_MODEL, idle_timeout=0.5),
            route("pool", secondary.url, SECONDARY_MODEL),
        ))

    def _stream_until_error(self, proxy) -> tuple[list[str], openai.APIError]:
        parts: list[str] = []
        with openai_through(proxy) as client:
            with pytest.raises(openai.APIError) as raised:
                for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
                    parts.append(chunk.choices[0].delta.content)
        return parts, raised.value

    def test_upstream_dying_mid_stream_is_an_error_not_a_retry(self, upstreams, proxy):
        primary, secondary = upstreams
        parts = tokens(5)
        primary.script = Stream(events=openai_chat_events(parts), interval=0.1, die_after=2)

        got, error = self._stream_until_error(proxy)

        assert got == parts[:2]
        assert "truncated" in error.message, error.message
        primary.only().wait(3)
        assert secondary.exchanges == [], "the proxy fell back after bytes had gone to the client"
        [record] = wait_for_records(proxy, 1)
        assert (record["candidates_tried"], record["upstream_model"], record["outcome"]) == (
            "1", PRIMARY_MODEL, "upstream_error")

    def test_upstream_hanging_mid_stream_is_an_error_event_not_a_retry(self, upstreams, proxy):
        primary, secondary = upstreams
        parts = tokens(3)
        primary.script = Stream(events=openai_chat_events(parts), interval=3)

        start = time.monotonic()
        got, error = self._stream_until_error(proxy)

        assert got == parts[:1]
        assert "0.5 s" in error.message, error.message
        assert time.monotonic() - start < 2.5
        exchange = primary.only()
        exchange.wait(3)
        assert exchange.peer_closed_at is not None and not exchange.completed
        assert secondary.exchanges == []
        [record] = wait_for_records(proxy, 1)
        assert (record["candidates_tried"], record["outcome"], record["detail"]) == (
            "1", "timeout", "upstream_idle_timeout")


# --- heartbeat ----------------------------------------------------------------------------------


def test_heartbeat_commits_early_and_keeps_the_stream_parseable(start_proxy, upstream):
    parts = tokens(3)
    upstream.script = Stream(events=openai_chat_events(parts), headers_delay=1.2)
    proxy = start_proxy(routes_config(upstream.url, heartbeat=0.3))

    with httpx_through(proxy) as http:
        http.get(f"{BASE}/v1/models")  # the tunnel is up before the clock starts
        start = time.monotonic()
        with http.stream("POST", f"{BASE}/v1/chat/completions", json=CHAT) as response:
            headers_after = time.monotonic() - start
            text = "".join(response.iter_text())

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert headers_after < 0.75, f"status line after {headers_after:.2f} s"
    first_data = text.index("data: ")
    assert text[:first_data].count(": keep-alive\n\n") >= 3, text[:first_data]
    assert ": keep-alive" not in text[first_data:], "heartbeats after the upstream answered"
    assert text.endswith("data: [DONE]\n\n")

    with openai_through(proxy) as client:
        assert stream_text(client) == "".join(parts)


# --- max_concurrent -------------------------------------------------------------------------------


def test_max_concurrent_answers_429_with_retry_after(start_proxy, upstream):
    upstream.script = Stream(events=openai_chat_events(tokens(10)), interval=0.1)
    proxy = start_proxy(routes_config(upstream.url, max_concurrent=1))

    with httpx_through(proxy) as first, httpx_through(proxy) as second:
        with first.stream("POST", f"{BASE}/v1/chat/completions", json=CHAT) as streaming:
            assert streaming.status_code == 200
            chunks = streaming.iter_text()  # kept: a discarded iterator closes the response
            next(chunks)
            busy = second.post(f"{BASE}/v1/chat/completions", json=CHAT)
            assert "".join(chunks).endswith("data: [DONE]\n\n"), "the slow stream was disturbed"

    assert busy.status_code == 429
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "route_busy"
    assert len(upstream.exchanges) == 1, "the refused request reached the upstream"

    # The slot is given back when a stream ends, and when its client leaves mid-stream.
    with httpx_through(proxy) as http:
        with http.stream("POST", f"{BASE}/v1/chat/completions", json=CHAT) as leaving:
            assert leaving.status_code == 200
            next(leaving.iter_bytes())
    upstream.exchanges[-1].wait(3)
    with httpx_through(proxy) as http:
        wait_until(lambda: http.post(f"{BASE}/v1/chat/completions", json=CHAT).status_code == 200,
                   "a request is admitted after the client in flight left", timeout=3)
    records = request_records(proxy.log_text())
    assert [r["outcome"] for r in records[:2]] == ["rejected", "ok"], records


def test_max_concurrent_moves_on_to_the_next_candidate(start_proxy, make_upstream):
    primary, secondary = make_upstream(), make_upstream()
    primary.script = Stream(events=openai_chat_events(tokens(5)), interval=0.1)
    secondary.script = Stream(events=openai_chat_events(["from-secondary"], model=SECONDARY_MODEL))
    proxy = start_proxy(config(
        route("pool", primary.url, PRIMARY_MODEL, max_concurrent=1),
        route("pool", secondary.url, SECONDARY_MODEL),
    ))

    with httpx_through(proxy) as first, openai_through(proxy) as second:
        with first.stream("POST", f"{BASE}/v1/chat/completions", json=CHAT) as streaming:
            chunks = streaming.iter_text()
            next(chunks)
            assert stream_text(second) == "from-secondary"
            "".join(chunks)

    assert len(primary.exchanges) == 1 and len(secondary.exchanges) == 1


# --- usage in the request log -----------------------------------------------------------------------

SECRET_PROMPT = "zebra-prompt-content-7"
SECRET_PARTS = ["quokka-part-1 ", "quokka-part-2"]


def test_request_log_carries_the_upstreams_usage_and_no_secrets(start_proxy, upstream):
    proxy = start_proxy(routes_config(upstream.url))
    messages = [{"role": "user", "content": SECRET_PROMPT}]

    upstream.script = Stream(events=openai_events_with_usage(SECRET_PARTS, 11, 22), headers_delay=0.2)
    with openai_through(proxy) as client:
        chunks = list(client.chat.completions.create(model="client-model", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == 11 and chunks[-1].usage.completion_tokens == 22

    upstream.script = Stream(events=anthropic_message_events(SECRET_PARTS, input_tokens=13, output_tokens=17), headers_delay=0.2)
    with anthropic_through(proxy) as client:
        with client.messages.stream(model="claude-client", max_tokens=64, messages=messages) as stream:
            assert "".join(stream.text_stream) == "".join(SECRET_PARTS)

    records = wait_for_records(proxy, 2)
    usage = [(r["protocol"], r["input_tokens"], r["output_tokens"]) for r in records]
    assert usage == [("openai_chat_completions", "11", "22"), ("anthropic_messages", "13", "17")]
    for record in records:
        assert 150 < float(record["ttft_ms"]) < 2000, record
        assert float(record["headers_ms"]) <= float(record["ttft_ms"]), record

    log = proxy.log_text()
    for secret in (OPENAI_KEY, ANTHROPIC_KEY, "sk-client-secret", "sk-ant-client", SECRET_PROMPT, *SECRET_PARTS):
        assert secret.strip() not in log, f"{secret!r} is in the proxy's log"


# --- reload -----------------------------------------------------------------------------------------


def _stream_raw(proxy, body: dict[str, Any] = CHAT) -> str:
    with httpx_through(proxy) as http:
        with http.stream("POST", f"{BASE}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            return "".join(response.iter_text())


def _invalid(base_url: str) -> dict[str, Any]:
    broken = routes_config(base_url)
    broken["routes"][0]["endpoint"] = "ftp://nowhere.example/v1"
    return broken


def test_sighup_reload_keeps_streams_in_flight_and_routes_new_requests(start_proxy, make_upstream):
    a, b = make_upstream(), make_upstream()
    a_events = openai_chat_events(tokens(19))  # 20 events, 100 ms apart
    a.script = Stream(events=a_events, interval=0.1)
    b.script = Stream(events=openai_chat_events(["from-b"]))
    proxy = start_proxy(routes_config(a.url), env={"NAVTWIST_MAX_TOKENS": "100"})
    asking = {**CHAT, "max_tokens": 500}

    with ThreadPoolExecutor(5) as pool:
        streams = [pool.submit(_stream_raw, proxy, asking) for _ in range(5)]
        a.wait_for(5)
        proxy.write_config({**routes_config(b.url), "plugins": ["cap_max_tokens"]})
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for_log("config reloaded")
        after = _stream_raw(proxy, asking)
        in_flight = [future.result(timeout=10) for future in streams]

    assert "from-b" in after and b.only().json()["model"] == "route-model"
    assert b.only().json()["max_tokens"] == 100, "the reloaded plugins were not applied"
    assert all(e.json()["max_tokens"] == 500 for e in a.exchanges)
    assert in_flight == [b"".join(a_events).decode()] * 5, "a stream in flight was disturbed by the reload"
    assert len(a.exchanges) == 5
    for exchange in a.exchanges:
        exchange.wait(3)
        assert exchange.completed

    proxy.write_config(_invalid(b.url))
    os.kill(proxy.pid, signal.SIGHUP)
    log = proxy.wait_for_log("config reload failed")
    [failure] = [line for line in log.splitlines() if "config reload failed" in line]
    assert "routes[0].endpoint" in failure, failure
    assert "from-b" in _stream_raw(proxy)
    assert len(b.exchanges) == 2 and len(a.exchanges) == 5


def test_watch_picks_up_a_changed_file(start_proxy, make_upstream):
    a, b = make_upstream(), make_upstream()
    a.script = Stream(events=openai_chat_events(["from-a"]))
    b.script = Stream(events=openai_chat_events(["from-b"]))
    proxy = start_proxy(routes_config(a.url), args=("--watch",))
    assert "from-a" in _stream_raw(proxy)

    proxy.write_config(routes_config(b.url))
    changed = time.monotonic()
    proxy.wait_for_log("config reloaded", timeout=4)
    assert time.monotonic() - changed < 3.2

    assert "from-b" in _stream_raw(proxy)
    assert len(a.exchanges) == 1 and len(b.exchanges) == 1
