"""Tests for navtwist.inference.mock: the local model server behind C{mock://} routes.

Everything runs on a L{MemoryReactorClock}; time only moves with
C{clock.advance}, so "one event per interval" is checked exactly.
"""
from __future__ import annotations

import json
from io import BytesIO
from typing import Any

import pytest
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone, ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface.verify import verifyObject

from navtwist.inference.mock import CANNED_ANSWER, CANNED_TOKENS, DEFAULT_MODEL, MockAgent

INTERVAL = 0.02
BASE = "mock:///v1"


class Recorder(Protocol):
    """Records every C{dataReceived} call and how the body ended."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason


def client_for(clock: MemoryReactorClock, interval: float = INTERVAL) -> HTTPClient:
    """treq over the mock, with request bodies read on C{clock}.

    treq's default producer for bytes is C{FileBodyProducer(BytesIO(data))}
    on the global cooperator, which ticks on the global reactor; giving it a
    cooperator scheduled on C{clock} keeps the tests deterministic while still
    exercising an asynchronous C{startProducing}.
    """
    cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))
    return HTTPClient(
        MockAgent(clock, interval),
        data_to_body_producer=lambda data: FileBodyProducer(BytesIO(data), cooperator),
    )


def call(clock: MemoryReactorClock, method: str, url: str, **kwargs: Any) -> Any:
    """Issue a request and return treq's response once the body has been read."""
    d = client_for(clock).request(method, url, unbuffered=True, **kwargs)
    results: list[Any] = []
    d.addBoth(results.append)
    for _ in range(10):
        if results:
            break
        clock.advance(0)
    assert len(results) == 1, "the mock never answered"
    [response] = results
    assert not isinstance(response, Failure), response
    return response


def start(response: Any) -> Recorder:
    recorder = Recorder()
    response.deliverBody(recorder)
    return recorder


def drain(clock: MemoryReactorClock, recorder: Recorder) -> None:
    """Advance one interval at a time until the body has ended."""
    for _ in range(200):
        if recorder.reason is not None:
            return
        clock.advance(INTERVAL)
    raise AssertionError("the body never ended")


def stream(clock: MemoryReactorClock, path: str, body: dict[str, Any]) -> tuple[Any, Recorder]:
    response = call(clock, "POST", BASE + path, json={**body, "stream": True})
    recorder = start(response)
    drain(clock, recorder)
    return response, recorder


def parse_event(chunk: bytes) -> tuple[str | None, str]:
    """One SSE event: its optional C{event:} name and its C{data:} payload."""
    assert chunk.endswith(b"\n\n"), chunk
    name = None
    data = []
    for line in chunk.decode().rstrip("\n").split("\n"):
        field, _, value = line.partition(": ")
        if field == "event":
            name = value
        else:
            assert field == "data", line
            data.append(value)
    return name, "\n".join(data)


def events(recorder: Recorder) -> list[tuple[str | None, Any]]:
    """Every event, its data decoded as JSON except for the C{[DONE]} sentinel."""
    parsed = []
    for chunk in recorder.chunks:
        name, data = parse_event(chunk)
        parsed.append((name, data if data == "[DONE]" else json.loads(data)))
    return parsed


def content(recorder: Recorder) -> Any:
    return json.loads(b"".join(recorder.chunks))


def assert_clean_end(recorder: Recorder, clock: MemoryReactorClock) -> None:
    assert recorder.reason is not None and recorder.reason.check(ResponseDone)
    assert clock.getDelayedCalls() == []


CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "say one two three"}]}


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


# --- streams ----------------------------------------------------------------


def test_chat_completions_stream(clock: MemoryReactorClock) -> None:
    response, recorder = stream(clock, "/chat/completions", CHAT)
    assert response.code == 200
    assert response.length is UNKNOWN_LENGTH
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    assert response.headers.getRawHeaders(b"cache-control") == [b"no-cache"]
    parsed = events(recorder)
    assert all(name is None for name, _ in parsed)
    assert parsed[-1][1] == "[DONE]"
    chunks = [data for _, data in parsed[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"gpt-test"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert deltas[1:-1] == list(CANNED_TOKENS)
    assert "".join(deltas) == CANNED_ANSWER
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all("usage" not in c for c in chunks)
    assert_clean_end(recorder, clock)


def test_chat_completions_stream_include_usage(clock: MemoryReactorClock) -> None:
    body = {**CHAT, "stream_options": {"include_usage": True}}
    _, recorder = stream(clock, "/chat/completions", body)
    parsed = events(recorder)
    assert parsed[-1][1] == "[DONE]"
    usage_chunk = parsed[-2][1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 4,  # "say one two three": the body really was read
        "completion_tokens": len(CANNED_TOKENS),
        "total_tokens": 4 + len(CANNED_TOKENS),
    }
    assert parsed[-3][1]["choices"][0]["finish_reason"] == "stop"


def test_completions_stream(clock: MemoryReactorClock) -> None:
    _, recorder = stream(clock, "/completions", {"model": "davinci", "prompt": "Once upon"})
    parsed = events(recorder)
    assert parsed[-1][1] == "[DONE]"
    chunks = [data for _, data in parsed[:-1]]
    assert {(c["object"], c["model"]) for c in chunks} == {("text_completion", "davinci")}
    assert [c["choices"][0]["text"] for c in chunks] == [*CANNED_TOKENS, ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert_clean_end(recorder, clock)


def test_responses_stream(clock: MemoryReactorClock) -> None:
    body = {"model": "gpt-r", "input": [{"role": "user", "content": "hello there"}]}
    _, recorder = stream(clock, "/responses", body)
    parsed = events(recorder)
    names = [name for name, _ in parsed]
    assert all(name == data["type"] for name, data in parsed)
    assert names[0] == "response.created"
    assert names[-1] == "response.completed"
    assert names.index("response.output_text.done") < names.index("response.completed")
    deltas = [data["delta"] for name, data in parsed if name == "response.output_text.delta"]
    assert deltas == list(CANNED_TOKENS)
    assert [data["sequence_number"] for _, data in parsed] == list(range(len(parsed)))
    done = next(data for name, data in parsed if name == "response.output_text.done")
    assert done["text"] == CANNED_ANSWER
    completed = parsed[-1][1]["response"]
    assert completed["status"] == "completed"
    assert completed["model"] == "gpt-r"
    assert completed["output"][0]["content"][0]["text"] == CANNED_ANSWER
    assert completed["usage"] == {
        "input_tokens": 2,
        "output_tokens": len(CANNED_TOKENS),
        "total_tokens": 2 + len(CANNED_TOKENS),
    }
    assert "[DONE]" not in [data for _, data in parsed]
    assert_clean_end(recorder, clock)


def test_anthropic_messages_stream(clock: MemoryReactorClock) -> None:
    body = {
        "model": "claude-test",
        "max_tokens": 100,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi you"}]}],
    }
    _, recorder = stream(clock, "/messages", body)
    parsed = events(recorder)
    names = [name for name, _ in parsed]
    n = len(CANNED_TOKENS)
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * n,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(name == data["type"] for name, data in parsed)
    message = parsed[0][1]["message"]
    assert message["model"] == "claude-test"
    assert message["usage"]["input_tokens"] == 4
    deltas = [data["delta"] for name, data in parsed if name == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"text_delta"}
    assert "".join(d["text"] for d in deltas) == CANNED_ANSWER
    message_delta = parsed[-2][1]
    assert message_delta["delta"]["stop_reason"] == "end_turn"
    assert message_delta["usage"]["output_tokens"] == n
    assert_clean_end(recorder, clock)


def test_model_defaults_when_absent(clock: MemoryReactorClock) -> None:
    _, recorder = stream(clock, "/chat/completions", {"messages": []})
    assert {data["model"] for _, data in events(recorder)[:-1]} == {DEFAULT_MODEL}


# --- pacing and flow control ------------------------------------------------


def started_stream(clock: MemoryReactorClock, recorder: Recorder | None = None) -> Recorder:
    response = call(clock, "POST", BASE + "/chat/completions", json={**CHAT, "stream": True})
    recorder = recorder or Recorder()
    response.deliverBody(recorder)
    return recorder


def deltas_of(recorder: Recorder) -> str:
    return "".join(
        data["choices"][0]["delta"].get("content", "")
        for _, data in events(recorder)
        if data != "[DONE]"
    )


def test_one_event_per_interval(clock: MemoryReactorClock) -> None:
    recorder = started_stream(clock)
    total = len(CANNED_TOKENS) + 3  # role chunk, tokens, finish chunk, [DONE]
    assert recorder.chunks == []
    clock.advance(INTERVAL * 0.9)
    assert recorder.chunks == []
    clock.advance(INTERVAL * 0.1)
    assert len(recorder.chunks) == 1
    for expected in range(2, total + 1):
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(INTERVAL)
        assert len(recorder.chunks) == expected
    assert_clean_end(recorder, clock)


def test_interval_is_configurable(clock: MemoryReactorClock) -> None:
    """Also the bodyProducer=None path: a GET through the stock treq client
    needs no cooperator and is answered at once."""
    d = HTTPClient(MockAgent(clock, interval=1.0)).get(BASE + "/models", unbuffered=True)
    recorder = start(self_result(d))
    clock.advance(0.5)
    assert recorder.chunks == []
    clock.advance(0.5)
    assert len(recorder.chunks) == 1


def test_pause_stops_delivery_and_resume_continues(clock: MemoryReactorClock) -> None:
    recorder = started_stream(clock)
    clock.advance(INTERVAL)
    clock.advance(INTERVAL)
    clock.advance(INTERVAL)
    assert len(recorder.chunks) == 3
    producer = recorder.transport
    assert verifyObject(IPushProducer, producer)
    producer.pauseProducing()
    assert clock.getDelayedCalls() == []
    for _ in range(100):
        clock.advance(INTERVAL)
    assert len(recorder.chunks) == 3
    producer.resumeProducing()
    producer.resumeProducing()  # a second resume must not double-schedule
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(INTERVAL)
    assert len(recorder.chunks) == 4
    drain(clock, recorder)
    assert deltas_of(recorder) == CANNED_ANSWER
    assert events(recorder)[-1][1] == "[DONE]"
    assert_clean_end(recorder, clock)


class PausingRecorder(Recorder):
    """Pauses from inside every C{dataReceived}, as a relay with a full buffer does."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.pauseProducing()


def test_pause_from_inside_data_received(clock: MemoryReactorClock) -> None:
    recorder = started_stream(clock, PausingRecorder())
    for expected in range(1, len(CANNED_TOKENS) + 4):
        clock.advance(INTERVAL * 10)
        assert len(recorder.chunks) == expected
        assert recorder.reason is None  # paused: not even the end is delivered
        assert clock.getDelayedCalls() == []
        recorder.transport.resumeProducing()
    clock.advance(INTERVAL)
    assert deltas_of(recorder) == CANNED_ANSWER
    assert_clean_end(recorder, clock)


class BouncingRecorder(Recorder):
    """Pauses and immediately resumes inside C{dataReceived}."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.pauseProducing()
        self.transport.resumeProducing()


def test_pause_resume_inside_data_received_does_not_double_schedule(
    clock: MemoryReactorClock,
) -> None:
    recorder = started_stream(clock, BouncingRecorder())
    for expected in range(1, len(CANNED_TOKENS) + 3):
        clock.advance(INTERVAL)
        assert len(recorder.chunks) == expected
        assert len(clock.getDelayedCalls()) == 1
    drain(clock, recorder)
    assert deltas_of(recorder) == CANNED_ANSWER
    assert_clean_end(recorder, clock)


def test_stop_producing_fails_the_body(clock: MemoryReactorClock) -> None:
    recorder = started_stream(clock)
    clock.advance(INTERVAL)
    clock.advance(INTERVAL)
    recorder.transport.stopProducing()
    assert recorder.reason is not None
    assert recorder.reason.check(ResponseFailed)
    [inner] = recorder.reason.value.reasons
    assert inner.check(ConnectionDone)
    assert clock.getDelayedCalls() == []
    clock.advance(INTERVAL * 50)
    assert len(recorder.chunks) == 2
    reason = recorder.reason
    recorder.transport.stopProducing()
    recorder.transport.resumeProducing()
    assert recorder.reason is reason
    assert clock.getDelayedCalls() == []


def test_stop_producing_while_paused(clock: MemoryReactorClock) -> None:
    recorder = started_stream(clock)
    clock.advance(INTERVAL)
    recorder.transport.pauseProducing()
    recorder.transport.stopProducing()
    assert recorder.reason is not None and recorder.reason.check(ResponseFailed)
    recorder.transport.resumeProducing()
    clock.advance(INTERVAL * 50)
    assert len(recorder.chunks) == 1
    assert clock.getDelayedCalls() == []


class StoppingRecorder(Recorder):
    """Drops the body as soon as it is connected, as the router's discard does."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class PausedAtStartRecorder(Recorder):
    def connectionMade(self) -> None:
        self.transport.pauseProducing()


def test_stop_producing_from_connection_made(clock: MemoryReactorClock) -> None:
    recorder = started_stream(clock, StoppingRecorder())
    assert recorder.reason is not None and recorder.reason.check(ResponseFailed)
    assert clock.getDelayedCalls() == []
    clock.advance(INTERVAL * 10)
    assert recorder.chunks == []


def test_pause_from_connection_made(clock: MemoryReactorClock) -> None:
    recorder = started_stream(clock, PausedAtStartRecorder())
    assert clock.getDelayedCalls() == []
    clock.advance(INTERVAL * 10)
    assert recorder.chunks == []
    recorder.transport.resumeProducing()
    clock.advance(INTERVAL)
    assert len(recorder.chunks) == 1


def test_stop_producing_after_the_end_is_harmless(clock: MemoryReactorClock) -> None:
    recorder = started_stream(clock)
    drain(clock, recorder)
    recorder.transport.stopProducing()
    assert recorder.reason is not None and recorder.reason.check(ResponseDone)


def test_cancel_while_reading_the_body_leaves_nothing_scheduled(
    clock: MemoryReactorClock,
) -> None:
    d = client_for(clock).post(BASE + "/chat/completions", json=CHAT, unbuffered=True)
    assert clock.getDelayedCalls() != []  # the body read is in progress
    failures: list[Failure] = []
    d.addErrback(failures.append)
    d.cancel()
    assert len(failures) == 1 and failures[0].check(CancelledError)
    assert clock.getDelayedCalls() == []
    clock.advance(1)
    assert clock.getDelayedCalls() == []


def test_cancel_of_an_answered_request_schedules_nothing(clock: MemoryReactorClock) -> None:
    """Nothing is paced until the body is asked for, so an answered but
    unread request leaves no delayed calls."""
    d = client_for(clock).post(
        BASE + "/chat/completions", json={**CHAT, "stream": True}, unbuffered=True
    )
    clock.advance(0)
    d.addErrback(lambda f: pytest.fail(f"cancelled after it fired: {f}"))
    d.cancel()
    assert clock.getDelayedCalls() == []


class StubProducer:
    """A body producer the test finishes by hand, in two writes."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred()
        self.stopped = False
        self.length = UNKNOWN_LENGTH

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(b'{"model": "sp')
        consumer.write(b'lit", "messages": []}')
        return self.done

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


def test_body_is_read_through_start_producing(clock: MemoryReactorClock) -> None:
    producer = StubProducer()
    d = MockAgent(clock).request(b"POST", b"mock:///v1/chat/completions", None, producer)
    assert not d.called  # waits for the producer's Deferred
    producer.done.callback(None)
    recorder = start(self_result(d))
    clock.advance(INTERVAL)
    assert content(recorder)["model"] == "split"


@pytest.mark.parametrize("succeeds", [True, False])
def test_cancel_stops_the_producer_even_if_it_fires_later(
    clock: MemoryReactorClock, succeeds: bool
) -> None:
    producer = StubProducer()
    d = MockAgent(clock).request(b"POST", b"mock:///v1/chat/completions", None, producer)
    failures: list[Failure] = []
    d.addErrback(failures.append)
    d.cancel()
    assert producer.stopped
    assert len(failures) == 1 and failures[0].check(CancelledError)
    # A producer that fires after stopProducing breaks its contract; ignore it.
    if succeeds:
        producer.done.callback(None)
    else:
        producer.done.errback(ValueError("late"))
    assert self_result(producer.done) is None
    assert clock.getDelayedCalls() == []


def self_result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert len(results) == 1 and not isinstance(results[0], Failure), results
    return results[0]


def test_treq_default_bytes_producer_uses_the_global_cooperator(
    clock: MemoryReactorClock,
) -> None:
    """treq's default body producer does not run on the mock's clock: the
    request waits for the global reactor, and cancelling it stops the read."""
    from twisted.internet import task

    d = HTTPClient(MockAgent(clock)).post(BASE + "/chat/completions", json=CHAT, unbuffered=True)
    clock.advance(1)
    assert not d.called
    assert task._theCooperator._tasks  # type: ignore[attr-defined]
    d.addErrback(lambda f: f.trap(CancelledError))
    d.cancel()
    assert not task._theCooperator._tasks  # type: ignore[attr-defined]
    assert clock.getDelayedCalls() == []


def test_interfaces(clock: MemoryReactorClock) -> None:
    agent = MockAgent(clock)
    assert verifyObject(IAgent, agent)
    response = call(clock, "GET", BASE + "/models")
    assert verifyObject(IResponse, response.original)
    assert response.version == (b"HTTP", 1, 1)
    assert response.phrase == b"OK"
    assert response.previousResponse is None
    response.original.setPreviousResponse(response.original)
    assert response.previousResponse is response.original
    assert verifyObject(IBodyProducer, FileBodyProducer(BytesIO(b"")))


def test_body_is_delivered_once(clock: MemoryReactorClock) -> None:
    response = call(clock, "GET", BASE + "/models")
    start(response)
    with pytest.raises(RuntimeError):
        start(response)
    clock.advance(INTERVAL)
    assert clock.getDelayedCalls() == []


# --- complete JSON documents ------------------------------------------------


def document(clock: MemoryReactorClock, method: str, url: str, **kwargs: Any) -> tuple[Any, Any]:
    """The response and its body, which must arrive in a single chunk."""
    response = call(clock, method, url, **kwargs)
    recorder = start(response)
    assert recorder.chunks == []
    clock.advance(INTERVAL)
    assert len(recorder.chunks) == 1
    assert_clean_end(recorder, clock)
    body = recorder.chunks[0]
    assert response.length == len(body)
    assert response.headers.getRawHeaders(b"content-length") == [str(len(body)).encode()]
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    return response, json.loads(body)


def test_chat_completion_document(clock: MemoryReactorClock) -> None:
    response, body = document(clock, "POST", BASE + "/chat/completions", json=CHAT)
    assert response.code == 200
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-test"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": CANNED_ANSWER}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": len(CANNED_TOKENS),
        "total_tokens": 4 + len(CANNED_TOKENS),
    }


def test_stream_false_is_a_document(clock: MemoryReactorClock) -> None:
    _, body = document(
        clock, "POST", BASE + "/chat/completions", json={**CHAT, "stream": False}
    )
    assert body["object"] == "chat.completion"


def test_completion_document(clock: MemoryReactorClock) -> None:
    _, body = document(clock, "POST", BASE + "/completions", json={"prompt": ["a b", "c"]})
    assert body["object"] == "text_completion"
    assert body["model"] == DEFAULT_MODEL
    assert body["choices"][0]["text"] == CANNED_ANSWER
    assert body["usage"]["prompt_tokens"] == 3


def test_responses_document(clock: MemoryReactorClock) -> None:
    _, body = document(
        clock, "POST", BASE + "/responses", json={"model": "gpt-r", "input": "one two"}
    )
    assert body["object"] == "response"
    assert body["status"] == "completed"
    assert body["model"] == "gpt-r"
    [item] = body["output"]
    assert item["role"] == "assistant"
    assert item["content"][0] == {"type": "output_text", "text": CANNED_ANSWER, "annotations": []}
    assert body["usage"] == {
        "input_tokens": 2,
        "output_tokens": len(CANNED_TOKENS),
        "total_tokens": 2 + len(CANNED_TOKENS),
    }


def test_anthropic_message_document(clock: MemoryReactorClock) -> None:
    request = {"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]}
    _, body = document(clock, "POST", BASE + "/messages", json=request)
    assert body["type"] == "message"
    assert body["role"] == "assistant"
    assert body["model"] == "claude-test"
    assert body["content"] == [{"type": "text", "text": CANNED_ANSWER}]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"] == {"input_tokens": 1, "output_tokens": len(CANNED_TOKENS)}


def test_embeddings_are_deterministic(clock: MemoryReactorClock) -> None:
    url = BASE + "/embeddings"
    _, one = document(clock, "POST", url, json={"model": "emb", "input": "hello world"})
    _, many = document(clock, "POST", url, json={"input": ["hello world", "goodbye"]})
    assert one["object"] == "list"
    assert one["model"] == "emb"
    assert many["model"] == DEFAULT_MODEL
    assert one["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert [d["index"] for d in many["data"]] == [0, 1]
    assert {d["object"] for d in many["data"]} == {"embedding"}
    vectors = [d["embedding"] for d in many["data"]]
    assert all(len(v) == 8 and all(isinstance(x, float) for x in v) for v in vectors)
    assert one["data"][0]["embedding"] == vectors[0]
    assert vectors[0] != vectors[1]
    _, again = document(MemoryReactorClock(), "POST", url, json={"input": "goodbye"})
    assert again["data"][0]["embedding"] == vectors[1]


@pytest.mark.parametrize("value", [42, [], [1, 2], None])
def test_embeddings_reject_other_inputs(clock: MemoryReactorClock, value: Any) -> None:
    response, body = document(clock, "POST", BASE + "/embeddings", json={"input": value})
    assert response.code == 400
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "url", [BASE + "/models", "mock://x/v1/models", "mock://x/v1/models?limit=5"]
)
def test_model_list(clock: MemoryReactorClock, url: str) -> None:
    response, body = document(clock, "GET", url)
    assert response.code == 200
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [DEFAULT_MODEL]
    assert body["data"][0]["object"] == "model"


def test_model_by_id(clock: MemoryReactorClock) -> None:
    response, body = document(clock, "GET", BASE + "/models/gpt-4o%2Fmini")
    assert response.code == 200
    assert body["id"] == "gpt-4o/mini"
    assert body["object"] == "model"


# --- errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/unknown"), ("GET", "/v1/chat/completions"), ("DELETE", "/v1/models"),
     ("POST", "/v1/models/")],
)
def test_unknown_routes_are_404(clock: MemoryReactorClock, method: str, path: str) -> None:
    response, body = document(clock, method, "mock://" + path, json={})
    assert response.code == 404
    assert response.phrase == b"Not Found"
    assert body["error"]["type"] == "not_found_error"
    assert body["error"]["code"] == "not_found"
    assert path in body["error"]["message"]


@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b""])
def test_invalid_json_is_400_openai_style(clock: MemoryReactorClock, data: bytes) -> None:
    kwargs: dict[str, Any] = {"data": data} if data else {}
    response, body = document(clock, "POST", BASE + "/chat/completions", **kwargs)
    assert response.code == 400
    assert set(body) == {"error"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]


def test_invalid_json_is_400_anthropic_style(clock: MemoryReactorClock) -> None:
    response, body = document(clock, "POST", BASE + "/messages", data=b"{oops")
    assert response.code == 400
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]
