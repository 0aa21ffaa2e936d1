"""Tests for navtwist.inference.usage: passive usage and first-token accounting.

Streams come from the mock backend (driven on a L{MemoryReactorClock}) or are
written by hand to hit the SSE corner cases; every re-chunking of a stream
must give the same L{Usage}, because the relay's chunk boundaries are
arbitrary.
"""
from __future__ import annotations

import json
import os
import random
import time
import timeit
import tracemalloc
from collections.abc import Iterable
from typing import Any

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

import navtwist.inference.usage
from navtwist.inference.mock import CANNED_TOKENS, MockAgent
from navtwist.upstream.body import BytesProducer
from navtwist.inference.protocols import (
    ANTHROPIC_MESSAGES,
    MODEL_DISCOVERY,
    OPENAI_CHAT_COMPLETIONS,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
)
from navtwist.inference.usage import Usage, UsageMeter

INTERVAL = 0.02
PROMPT = "one two three"  # the mock counts words: 3 input tokens

# Per streaming protocol: the mock request path and body, and the index of the
# first event that carries a token (chat opens with a role-only chunk; the
# Responses API and Anthropic open with bookkeeping events).
MESSAGES = [{"role": "user", "content": PROMPT}]
INCLUDE_USAGE = {"stream_options": {"include_usage": True}}
MOCK_CALLS: dict[str, tuple[bytes, dict[str, Any], int]] = {
    OPENAI_CHAT_COMPLETIONS: (b"/v1/chat/completions", {"messages": MESSAGES, **INCLUDE_USAGE}, 1),
    OPENAI_COMPLETIONS: (b"/v1/completions", {"prompt": PROMPT, **INCLUDE_USAGE}, 0),
    OPENAI_RESPONSES: (b"/v1/responses", {"input": PROMPT}, 4),
    ANTHROPIC_MESSAGES: (b"/v1/messages", {"messages": MESSAGES, "max_tokens": 64}, 2),
}
STREAMING = list(MOCK_CALLS)
MOCK_USAGE = (3, len(CANNED_TOKENS))


# --- driving the mock backend -----------------------------------------------


class _Feeder(Protocol):
    """Feeds each body chunk to a meter as it arrives, recording chunks and their times."""

    def __init__(self, meter: UsageMeter, clock: MemoryReactorClock) -> None:
        self.meter = meter
        self.clock = clock
        self.chunks: list[bytes] = []
        self.times: list[float] = []
        self.ended = False

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.times.append(self.clock.seconds())
        self.meter.feed(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.ended = True


def run_mock(
    protocol: str, path: bytes, body: dict[str, Any], streaming: bool, max_body: int = 1 << 20
) -> tuple[Usage, _Feeder]:
    """One mock call, its body metered live; the clock starts at 100 s."""
    clock = MemoryReactorClock()
    clock.advance(100)
    responses: list[IResponse] = []
    MockAgent(clock, INTERVAL).request(
        b"POST", b"mock://" + path, None, BytesProducer(json.dumps(body).encode())
    ).addCallback(responses.append)
    [response] = responses
    assert response.code == 200
    feeder = _Feeder(UsageMeter(protocol, streaming, clock.seconds, max_body), clock)
    response.deliverBody(feeder)
    while not feeder.ended:
        clock.advance(INTERVAL)
    return feeder.meter.finish(), feeder


def mock_stream(protocol: str) -> list[bytes]:
    path, body, _ = MOCK_CALLS[protocol]
    return run_mock(protocol, path, {**body, "stream": True}, True)[1].chunks


# --- metering byte streams --------------------------------------------------


def meter(protocol: str, chunks: Iterable[bytes], max_body: int = 1 << 20) -> Usage:
    """Usage of a stream fed in C{chunks}; the clock is constant, so splits cannot change it."""
    usage_meter = UsageMeter(protocol, True, lambda: 1.0, max_body)
    for chunk in chunks:
        usage_meter.feed(chunk)
    return usage_meter.finish()


def random_chunks(data: bytes, seed: int, largest: int = 40) -> list[bytes]:
    rng = random.Random(seed)
    chunks = []
    while data:
        size = rng.randint(1, largest)
        chunks.append(data[:size])
        data = data[size:]
    return chunks


def rechunkings(data: bytes) -> Iterable[list[bytes]]:
    """Every single cut point, one byte at a time, and seeded random chunk sizes."""
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]
    for seed in range(20):
        yield random_chunks(data, seed)


def sse(doc: Any, event: str | None = None, end: bytes = b"\n") -> bytes:
    """One event with default json.dumps spacing (not the mock's compact form)."""
    head = f"event: {event}{end.decode()}".encode() if event else b""
    return head + b"data: " + json.dumps(doc).encode() + end + end


# --- usage from the mock's real streams -------------------------------------


@pytest.mark.parametrize("protocol", STREAMING)
def test_mock_stream_usage_and_first_token(protocol: str) -> None:
    """The clock reads at the first *content* chunk: chat's role-only chunk does not count."""
    path, body, first_content = MOCK_CALLS[protocol]
    usage, feeder = run_mock(protocol, path, {**body, "stream": True}, True)
    assert (usage.input_tokens, usage.output_tokens) == MOCK_USAGE
    assert usage.first_token_at == feeder.times[first_content]
    assert usage.events == len(feeder.chunks)
    assert usage.oversized_events == 0


def test_chat_stream_without_include_usage_has_no_counts() -> None:
    path = MOCK_CALLS[OPENAI_CHAT_COMPLETIONS][0]
    usage, feeder = run_mock(OPENAI_CHAT_COMPLETIONS, path, {"messages": MESSAGES, "stream": True}, True)
    assert (usage.input_tokens, usage.output_tokens) == (None, None)
    assert usage.first_token_at == feeder.times[1]


@pytest.mark.parametrize("protocol", STREAMING)
def test_every_rechunking_of_a_mock_stream_gives_the_same_usage(protocol: str) -> None:
    """The middle tokens, all alike, are left out to keep every-cut-point affordable."""
    chunks = mock_stream(protocol)
    data = b"".join(chunks[:6] + chunks[-4:])
    whole = meter(protocol, [data])
    assert (whole.input_tokens, whole.output_tokens, whole.first_token_at) == (*MOCK_USAGE, 1.0)
    for chunks in rechunkings(data):
        assert meter(protocol, chunks) == whole, [len(c) for c in chunks]


@pytest.mark.parametrize("ending", [b"\r\n", b"\r"], ids=["CRLF", "CR"])
@pytest.mark.parametrize("protocol", STREAMING)
def test_crlf_and_cr_line_endings(protocol: str, ending: bytes) -> None:
    data = b"".join(mock_stream(protocol))
    expected = meter(protocol, [data])
    converted = data.replace(b"\n", ending)
    assert meter(protocol, [converted]) == expected
    assert meter(protocol, [converted[i : i + 1] for i in range(len(converted))]) == expected
    for seed in range(10):
        assert meter(protocol, random_chunks(converted, seed)) == expected


# --- the SSE corner cases, together in one stream ---------------------------

CAP = 300
OVERSIZED = b'data: {"type":"message_delta","usage":{"output_tokens":999},"pad":"' + b"x" * 600 + b'"}\n\n'
# CRLF, CR, LF and LF+CRLF line endings, comments (alone and inside an event),
# multi-line data with multibyte text, a field without the optional space,
# malformed JSON, an oversized event carrying usage, and two cumulative
# message_delta counts of which the last wins.
TRICKY = b"".join(
    [
        b": keep-alive\r\n\r\n",
        sse(
            {
                "type": "message_start",
                "message": {
                    "usage": {
                        "input_tokens": 10,
                        "cache_creation_input_tokens": 5,
                        "cache_read_input_tokens": 100,
                        "output_tokens": 1,
                    }
                },
            },
            "message_start",
            b"\r\n",
        ),
        b"event: ping\rdata: {\"type\": \"ping\"}\r\r",
        b": comment line inside an event\n",
        b'event: content_block_delta\r\ndata: {"type": "content_block_delta",\r\n',
        'data: "delta": {"type": "text_delta", "text": "h\u00e9llo \u2713"}}\n\r\n'.encode(),
        b"data: {not json\n\n",
        OVERSIZED,
        b'event: message_delta\r\ndata:{"type":"message_delta","usage":{"output_tokens":7}}\r\n\r\n',
        sse({"type": "message_delta", "usage": {"output_tokens": 9}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop", b"\r"),
    ]
)
TRICKY_USAGE = Usage(input_tokens=115, output_tokens=9, first_token_at=1.0, events=7, oversized_events=1,
                     complete=True)


def test_every_rechunking_of_the_tricky_stream_gives_the_same_usage() -> None:
    for chunks in rechunkings(TRICKY):
        assert meter(ANTHROPIC_MESSAGES, chunks, CAP) == TRICKY_USAGE, [len(c) for c in chunks]


def test_comments_are_not_events() -> None:
    usage = meter(OPENAI_CHAT_COMPLETIONS, [b": keep-alive\n\n", b":\n\n", b": a\n: b\n\n"])
    assert usage == Usage()


def test_multi_line_data_is_joined_with_a_line_feed() -> None:
    """Split across data: lines, the usage chunk is one JSON text; a bare concatenation
    would turn the second event's "1" and "2" into 12."""
    first = b'data: {"choices": [], "usage": {"prompt_tokens": 5,\ndata: "completion_tokens": 6}}\n\n'
    second = b'data: {"choices": [], "usage": {"prompt_tokens": 1\ndata:2}}\n\n'
    usage = meter(OPENAI_CHAT_COMPLETIONS, [first, second])
    assert (usage.input_tokens, usage.output_tokens, usage.events) == (5, 6, 2)


def test_data_field_without_a_value() -> None:
    """A bare "data" line is the data field with an empty value: an event, but no JSON."""
    usage = meter(OPENAI_CHAT_COMPLETIONS, [b"data\n\n", b"data:\n\n"])
    assert usage.events == 2


def test_an_unterminated_final_event_is_dropped() -> None:
    usage = meter(OPENAI_COMPLETIONS, [b'data: {"choices": [], "usage": {"prompt_tokens": 4}}\n'])
    assert (usage.input_tokens, usage.events) == (None, 0)


def test_lf_completing_a_boundary_crlf_does_not_join_the_next_event() -> None:
    """A boundary ending in a CR at a chunk end may be half a CRLF: its LF is not part of
    the next event, which here is exactly at the cap."""
    usage_event = b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}'
    chunks = [b"data: [DONE]\n\r", b"\n" + usage_event + b"\n\n"]
    usage = meter(OPENAI_CHAT_COMPLETIONS, chunks, max_body=len(usage_event))
    assert (usage.input_tokens, usage.output_tokens, usage.oversized_events) == (2, 3, 0)


# --- malformed input ---------------------------------------------------------

# Malformed payloads, most carrying the byte markers that get an event decoded.
HOSTILE: list[bytes] = [
    b'{not json "usage" "delta" "text" .delta" "content_block_delta"',
    b'["usage", "delta"]',
    b'"usage"',
    b'\xff\xfe{"usage": 1}',
    b'{"usage": {"delta": ' + b"[" * 100_000,
    b'{"usage": {"prompt_tokens": ' + b"9" * 5000 + b"}}",
    b'{"choices": 5, "usage": "lots", "delta": 1}',
    b'{"choices": [5, null, {"delta": "text"}, {"text": null}], "usage": []}',
    b'{"usage": {"prompt_tokens": "5", "completion_tokens": true, "input_tokens": -1, "output_tokens": 1.5}}',
    b'{"usage": {"prompt_tokens": 1e400, "input_tokens": null}}',
    b'{"type": "message_start", "message": null, "usage": 5}',
    b'{"type": "message_start", "message": {"usage": [1]}, "content_block_delta": 1}',
    b'{"type": "message_delta", "usage": {"output_tokens": null, "input_tokens": "7"}}',
    b'{"type": "response.completed", "response": [], "usage": {}}',
    b'{"type": "response.completed", "response": {"usage": {"input_tokens": "x"}}}',
    b'{"type": 5, "delta": null, ".delta": "usage"}',
]
VALID_USAGE: dict[str, dict[str, Any]] = {
    OPENAI_CHAT_COMPLETIONS: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 8}},
    OPENAI_COMPLETIONS: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 8}},
    OPENAI_RESPONSES: {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 4, "output_tokens": 8}},
    },
    ANTHROPIC_MESSAGES: {"type": "message_delta", "usage": {"input_tokens": 4, "output_tokens": 8}},
}


@pytest.mark.parametrize("protocol", STREAMING)
def test_malformed_events_are_ignored(protocol: str) -> None:
    """They come after the real counts, which the last-wins rule would let them overwrite."""
    hostile = [b"data: " + payload + b"\n\n" for payload in HOSTILE]
    usage = meter(protocol, [sse(VALID_USAGE[protocol]), *hostile])
    assert (usage.input_tokens, usage.output_tokens, usage.events) == (4, 8, len(HOSTILE) + 1)


# --- what counts as the first token ------------------------------------------


def chat_delta(delta: dict[str, Any]) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": None if delta else "stop"}]}


TOOL_CALL = [{"index": 0, "function": {"arguments": "{"}}]
CONTENT_CASES: list[tuple[str, dict[str, Any], bool]] = [
    (OPENAI_CHAT_COMPLETIONS, chat_delta({"role": "assistant", "content": ""}), False),
    (OPENAI_CHAT_COMPLETIONS, chat_delta({"content": "Hi"}), True),
    (OPENAI_CHAT_COMPLETIONS, chat_delta({"content": None, "tool_calls": TOOL_CALL}), True),
    (OPENAI_CHAT_COMPLETIONS, chat_delta({"reasoning_content": "Hmm"}), True),
    (OPENAI_CHAT_COMPLETIONS, chat_delta({}), False),
    (OPENAI_CHAT_COMPLETIONS, {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}, False),
    (OPENAI_COMPLETIONS, {"choices": [{"index": 0, "text": ""}]}, False),
    (OPENAI_COMPLETIONS, {"choices": [{"index": 0, "text": "Hi"}]}, True),
    (OPENAI_RESPONSES, {"type": "response.created", "response": {"usage": None}}, False),
    (OPENAI_RESPONSES, {"type": "response.output_text.delta", "delta": "Hi"}, True),
    (OPENAI_RESPONSES, {"type": "response.function_call_arguments.delta", "delta": "{"}, True),
    (OPENAI_RESPONSES, {"type": "response.output_text.delta", "delta": ""}, False),
    (OPENAI_RESPONSES, {"type": "response.output_text.done", "text": "Hi"}, False),
    (ANTHROPIC_MESSAGES, {"type": "content_block_start", "content_block": {"type": "text", "text": ""}}, False),
    (ANTHROPIC_MESSAGES, {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}, True),
    (ANTHROPIC_MESSAGES, {"type": "ping"}, False),
]


@pytest.mark.parametrize(("protocol", "doc", "is_content"), CONTENT_CASES)
def test_what_counts_as_content(protocol: str, doc: dict[str, Any], is_content: bool) -> None:
    usage_meter = UsageMeter(protocol, True, lambda: 5.0)
    usage_meter.feed(sse(doc, doc.get("type")))
    assert usage_meter.finish().first_token_at == (5.0 if is_content else None)


def test_first_token_time_is_that_of_the_chunk_completing_the_event() -> None:
    now = [1.0]
    usage_meter = UsageMeter(OPENAI_CHAT_COMPLETIONS, True, lambda: now[0])
    event = sse({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    usage_meter.feed(event[:10])
    now[0] = 2.0
    usage_meter.feed(event[10:])
    now[0] = 3.0
    usage_meter.feed(event)
    assert usage_meter.finish().first_token_at == 2.0


def test_only_events_that_may_matter_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The role chunk and first token are decoded, then only the usage chunk: not every
    token, nor chunks that say "usage": null."""
    nulls = [sse({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": None})] * 5
    chunks = mock_stream(OPENAI_CHAT_COMPLETIONS) + nulls
    decoded: list[Any] = []
    loads = json.loads
    monkeypatch.setattr(navtwist.inference.usage.json, "loads", lambda data: decoded.append(data) or loads(data))
    usage = meter(OPENAI_CHAT_COMPLETIONS, chunks)
    assert (usage.input_tokens, usage.output_tokens) == MOCK_USAGE
    assert len(decoded) == 3


def test_anthropic_input_adds_cache_tokens_and_last_delta_wins() -> None:
    """message_delta counts are cumulative, input included when it is reported."""
    start_usage = {"input_tokens": 3, "cache_read_input_tokens": 40, "output_tokens": 1}
    final_usage = {"input_tokens": 5, "cache_creation_input_tokens": 60, "output_tokens": 9}
    usage = meter(
        ANTHROPIC_MESSAGES,
        [
            sse({"type": "message_start", "message": {"usage": start_usage}}, "message_start"),
            sse({"type": "message_delta", "usage": {"output_tokens": 4}}, "message_delta"),
            sse({"type": "message_delta", "usage": final_usage}, "message_delta"),
        ],
    )
    assert (usage.input_tokens, usage.output_tokens) == (65, 9)


def test_message_start_output_is_only_a_placeholder() -> None:
    head = mock_stream(ANTHROPIC_MESSAGES)[:1]  # message_start, output_tokens 1
    usage = meter(ANTHROPIC_MESSAGES, head)
    assert (usage.input_tokens, usage.output_tokens) == (3, None)


def test_a_stream_of_a_protocol_without_usage_is_only_counted() -> None:
    usage = meter(MODEL_DISCOVERY, [sse({"choices": [], "usage": {"prompt_tokens": 1}})])
    assert usage == Usage(events=1)


# --- bounded memory ----------------------------------------------------------


def test_an_endless_event_is_skipped_in_bounded_memory() -> None:
    cap = 1 << 20
    piece = b"x" * (64 << 10)
    usage_meter = UsageMeter(OPENAI_CHAT_COMPLETIONS, True, lambda: 1.0, cap)
    usage_meter.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 999}, "pad": "')
    tracemalloc.start()
    try:
        for _ in range(512):  # 32 MiB
            usage_meter.feed(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * cap
    usage_meter.feed(b'"}\n\n' + sse(VALID_USAGE[OPENAI_CHAT_COMPLETIONS]))
    usage = usage_meter.finish()
    assert (usage.input_tokens, usage.output_tokens, usage.events, usage.oversized_events) == (4, 8, 1, 1)


def test_consecutive_oversized_events_are_each_counted() -> None:
    big = b"data: " + b"y" * 200 + b"\n\n"
    stream = big * 3 + sse(VALID_USAGE[OPENAI_CHAT_COMPLETIONS])
    usage = meter(OPENAI_CHAT_COMPLETIONS, [stream], max_body=100)
    assert (usage.input_tokens, usage.events, usage.oversized_events) == (4, 1, 3)


# --- non-streaming bodies ----------------------------------------------------

NON_STREAMING: list[tuple[str, bytes, dict[str, Any], tuple[int, int | None]]] = [
    *((protocol, path, body, MOCK_USAGE) for protocol, (path, body, _) in MOCK_CALLS.items()),
    (OPENAI_EMBEDDINGS, b"/v1/embeddings", {"input": PROMPT}, (3, None)),
]


@pytest.mark.parametrize(
    ("protocol", "path", "body", "expected"), NON_STREAMING, ids=[case[0] for case in NON_STREAMING]
)
def test_mock_json_body_usage(
    protocol: str, path: bytes, body: dict[str, Any], expected: tuple[int, int | None]
) -> None:
    usage, feeder = run_mock(protocol, path, body, False)
    assert (usage.input_tokens, usage.output_tokens) == expected
    assert usage.first_token_at == feeder.times[0]
    assert usage.events == 0


def test_json_body_in_many_chunks_times_the_first() -> None:
    usage_doc = {"input_tokens": 2, "cache_creation_input_tokens": 7, "output_tokens": 3}
    body = json.dumps({"id": "msg_1", "usage": usage_doc}).encode()
    now = [10.0]
    usage_meter = UsageMeter(ANTHROPIC_MESSAGES, False, lambda: now[0], max_body=len(body))
    for chunk in random_chunks(body, 1, 7):
        usage_meter.feed(chunk)
        now[0] += 1
    assert usage_meter.finish() == Usage(input_tokens=9, output_tokens=3, first_token_at=10.0)


def test_json_body_over_the_cap_is_given_up() -> None:
    path, body, _ = MOCK_CALLS[OPENAI_CHAT_COMPLETIONS]
    usage, feeder = run_mock(OPENAI_CHAT_COMPLETIONS, path, body, False, max_body=100)
    assert len(feeder.chunks[0]) > 100
    assert usage == Usage(first_token_at=feeder.times[0])


@pytest.mark.parametrize("body", [b"", b"{not json", b"[1]", b'{"error": {"message": "overloaded"}}'])
def test_json_body_without_usage(body: bytes) -> None:
    usage_meter = UsageMeter(OPENAI_RESPONSES, False, lambda: 1.0)
    usage_meter.feed(body)
    usage = usage_meter.finish()
    assert (usage.input_tokens, usage.output_tokens) == (None, None)


# --- micro-benchmark (NAVTWIST_BENCH=1) --------------------------------------


def bench_chunk(delta: dict[str, Any], usage: Any = None) -> bytes:
    """A chat chunk as OpenAI sends it with include_usage: compact, "usage" always present."""
    doc = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "gpt-bench"}
    choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}] if delta else []
    payload = json.dumps({**doc, "choices": choices, "usage": usage}, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def benchmark_chat_stream(rounds: int = 100, repeat: int = 7) -> float:
    """Microseconds per event for a 200-event chat stream fed one event per chunk
    (best of C{repeat} runs: the minimum is the least disturbed by other load)."""
    chunks = [bench_chunk({"role": "assistant", "content": ""})]
    chunks += [bench_chunk({"content": f" word{i}"}) for i in range(197)]
    chunks.append(bench_chunk({}, {"prompt_tokens": 12, "completion_tokens": 197, "total_tokens": 209}))
    chunks.append(b"data: [DONE]\n\n")

    def run() -> None:
        for _ in range(rounds):
            usage_meter = UsageMeter(OPENAI_CHAT_COMPLETIONS, True, time.monotonic)
            for data in chunks:
                usage_meter.feed(data)
            usage = usage_meter.finish()
            assert (usage.input_tokens, usage.output_tokens, usage.events) == (12, 197, 200)

    return min(timeit.repeat(run, number=1, repeat=repeat)) / (rounds * len(chunks)) * 1e6


@pytest.mark.skipif(os.environ.get("NAVTWIST_BENCH") != "1", reason="micro-benchmark: set NAVTWIST_BENCH=1")
def test_benchmark_chat_stream(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the figure beside one json.loads of such a chunk, for scale on this machine."""
    per_event = benchmark_chat_stream()
    payload = bench_chunk({"content": " word"})[6:]
    loads = min(timeit.repeat(lambda: json.loads(payload), number=10_000, repeat=7)) * 100
    with capsys.disabled():
        print(f"\nUsageMeter: {per_event:.2f} µs per event (200-event chat stream);"
              f" one json.loads of a chunk: {loads:.2f} µs")


@pytest.mark.parametrize("protocol, final", [
    (OPENAI_CHAT_COMPLETIONS, b"data: [DONE]\n\n"),
    (OPENAI_COMPLETIONS, b"data: [DONE]\n\n"),
    (OPENAI_RESPONSES, b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n'),
    (ANTHROPIC_MESSAGES, b'event: message_stop\ndata: {"type":"message_stop"}\n\n'),
])
def test_the_final_event_marks_the_stream_complete(protocol: str, final: bytes) -> None:
    meter = navtwist.inference.usage.UsageMeter(protocol, True, lambda: 0.0)
    meter.feed(b'data: {"x": 1}\n\n')
    assert not meter.finish().complete
    meter = navtwist.inference.usage.UsageMeter(protocol, True, lambda: 0.0)
    meter.feed(b'data: {"x": 1}\n\n' + final)
    assert meter.finish().complete
