"""A model server in a box: an L{IAgent} that answers inference calls locally.

When no API key is configured a route's upstream is C{mock://}, and the router
gives treq a L{MockAgent} instead of a network agent.  The mock speaks through
the same interfaces a real upstream does (L{IAgent}, L{IResponse},
L{IPushProducer} flow control), so the relay path is exactly the one used in
production, and it streams its canned answer one token per C{interval} so that
token-by-token delivery is visible without any credentials.  It never touches
the network.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Callable
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from navtwist.inference.protocols import (
    ANTHROPIC_MESSAGES,
    COUNT_TOKENS_PATH,
    MODEL_DISCOVERY,
    OPENAI_CHAT_COMPLETIONS,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    detect,
    is_anthropic,
)

DEFAULT_MODEL = "navtwist-mock"

CANNED_ANSWER = (
    "This is navtwist's mock backend: no API key is configured, so this canned"
    " reply streams one word at a time to show that the relay works."
)

# Word tokens keep their leading space, as a real tokenizer stream does, so
# joining the deltas gives back the answer exactly.
CANNED_TOKENS: tuple[str, ...] = tuple(re.findall(r"\s*\S+", CANNED_ANSWER))

EMBEDDING_DIMENSIONS = 8

_Document = dict[str, Any]


# --- the request, as the per-protocol builders see it -----------------------


class _Call:
    """What a builder needs from one request: model, clock time, token counts."""

    def __init__(self, body: _Document, created: int) -> None:
        self.body = body
        model = body.get("model")
        self.model = model if isinstance(model, str) and model else DEFAULT_MODEL
        self.created = created
        self.input_tokens = sum(
            len(text.split())
            for key in ("system", "instructions", "messages", "prompt", "input")
            for text in _texts(body.get(key))
        )
        self.output_tokens = len(CANNED_TOKENS)
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True


def _texts(value: Any) -> Iterator[str]:
    """The text inside a prompt, message list or content-part list.

    Message dicts hold their text under C{content}; content parts under
    C{text}; anything else (images, tool calls, numbers) counts for nothing.
    """
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        yield from _texts(value.get("text", value.get("content")))


def _sse(data: _Document | str, event: str | None = None) -> bytes:
    """One server-sent event; OpenAI's Responses API and Anthropic name theirs."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {payload}\n\n".encode()


# --- OpenAI chat/completions and completions --------------------------------


def _openai_usage(call: _Call) -> _Document:
    return {
        "prompt_tokens": call.input_tokens,
        "completion_tokens": call.output_tokens,
        "total_tokens": call.input_tokens + call.output_tokens,
    }


def _openai_header(call: _Call, id_: str, object_: str) -> _Document:
    return {"id": id_, "object": object_, "created": call.created, "model": call.model}


def _openai_tail(call: _Call, id_: str, object_: str) -> Iterator[bytes]:
    """The optional usage chunk and the C{[DONE]} sentinel that end both OpenAI streams."""
    if call.include_usage:
        yield _sse({**_openai_header(call, id_, object_), "choices": [], "usage": _openai_usage(call)})
    yield _sse("[DONE]")


_CHAT_ID = "chatcmpl-navtwistmock"


def _chat_document(call: _Call) -> _Document:
    return {
        **_openai_header(call, _CHAT_ID, "chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": CANNED_ANSWER},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _openai_usage(call),
    }


def _chat_events(call: _Call) -> Iterator[bytes]:
    def chunk(delta: _Document, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**_openai_header(call, _CHAT_ID, "chat.completion.chunk"), "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    for token in CANNED_TOKENS:
        yield chunk({"content": token})
    yield chunk({}, "stop")
    yield from _openai_tail(call, _CHAT_ID, "chat.completion.chunk")


_COMPLETION_ID = "cmpl-navtwistmock"


def _completion_document(call: _Call) -> _Document:
    choice = {"index": 0, "text": CANNED_ANSWER, "logprobs": None, "finish_reason": "stop"}
    return {
        **_openai_header(call, _COMPLETION_ID, "text_completion"),
        "choices": [choice],
        "usage": _openai_usage(call),
    }


def _completion_events(call: _Call) -> Iterator[bytes]:
    def chunk(text: str, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**_openai_header(call, _COMPLETION_ID, "text_completion"), "choices": [choice]})

    for token in CANNED_TOKENS:
        yield chunk(token)
    yield chunk("", "stop")
    yield from _openai_tail(call, _COMPLETION_ID, "text_completion")


# --- OpenAI Responses API ---------------------------------------------------

_RESPONSE_ID = "resp_navtwistmock"
_ITEM_ID = "msg_navtwistmock"


def _responses_part(text: str) -> _Document:
    return {"type": "output_text", "text": text, "annotations": []}


def _responses_item(status: str, content: list[_Document]) -> _Document:
    return {"type": "message", "id": _ITEM_ID, "status": status, "role": "assistant", "content": content}


def _responses_document(call: _Call, completed: bool = True) -> _Document:
    """The response object: in flight (for C{response.created}) or finished."""
    item = _responses_item("completed", [_responses_part(CANNED_ANSWER)])
    usage = {
        "input_tokens": call.input_tokens,
        "output_tokens": call.output_tokens,
        "total_tokens": call.input_tokens + call.output_tokens,
    }
    return {
        "id": _RESPONSE_ID,
        "object": "response",
        "created_at": call.created,
        "status": "completed" if completed else "in_progress",
        "model": call.model,
        "output": [item] if completed else [],
        "usage": usage if completed else None,
    }


def _responses_events(call: _Call) -> Iterator[bytes]:
    """The event sequence OpenAI sends, including the item/part bookkeeping
    events the SDKs' stream accumulators rely on."""
    where = {"item_id": _ITEM_ID, "output_index": 0, "content_index": 0}
    events: list[tuple[str, _Document]] = [
        ("response.created", {"response": _responses_document(call, completed=False)}),
        ("response.in_progress", {"response": _responses_document(call, completed=False)}),
        ("response.output_item.added", {"output_index": 0, "item": _responses_item("in_progress", [])}),
        ("response.content_part.added", {**where, "part": _responses_part("")}),
        *(("response.output_text.delta", {**where, "delta": token}) for token in CANNED_TOKENS),
        ("response.output_text.done", {**where, "text": CANNED_ANSWER}),
        ("response.content_part.done", {**where, "part": _responses_part(CANNED_ANSWER)}),
        (
            "response.output_item.done",
            {"output_index": 0, "item": _responses_item("completed", [_responses_part(CANNED_ANSWER)])},
        ),
        ("response.completed", {"response": _responses_document(call)}),
    ]
    for sequence_number, (name, data) in enumerate(events):
        yield _sse({"type": name, "sequence_number": sequence_number, **data}, name)


# --- Anthropic Messages -----------------------------------------------------


def _message_document(call: _Call, completed: bool = True) -> _Document:
    """The message object: empty (for C{message_start}) or finished."""
    return {
        "id": "msg_navtwistmock",
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": [{"type": "text", "text": CANNED_ANSWER}] if completed else [],
        "stop_reason": "end_turn" if completed else None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": call.input_tokens,
            "output_tokens": call.output_tokens if completed else 1,
        },
    }


def _message_events(call: _Call) -> Iterator[bytes]:
    events: list[_Document] = [
        {"type": "message_start", "message": _message_document(call, completed=False)},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        *(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}}
            for token in CANNED_TOKENS
        ),
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": call.output_tokens},
        },
        {"type": "message_stop"},
    ]
    for data in events:
        yield _sse(data, data["type"])


# --- embeddings and model discovery -----------------------------------------


def _embedding(text: str) -> list[float]:
    """Deterministic floats in [-1, 1) from a hash: the same input, the same vector."""
    digest = hashlib.sha256(text.encode()).digest()
    return [
        round(int.from_bytes(digest[i * 4 : i * 4 + 4], "big") / 2**31 - 1, 6)
        for i in range(EMBEDDING_DIMENSIONS)
    ]


def _model(model_id: str) -> _Document:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "navtwist"}


_STREAMS: dict[str, Callable[[_Call], Iterable[bytes]]] = {
    OPENAI_CHAT_COMPLETIONS: _chat_events,
    OPENAI_COMPLETIONS: _completion_events,
    OPENAI_RESPONSES: _responses_events,
    ANTHROPIC_MESSAGES: _message_events,
}

_DOCUMENTS: dict[str, Callable[[_Call], _Document]] = {
    OPENAI_CHAT_COMPLETIONS: _chat_document,
    OPENAI_COMPLETIONS: _completion_document,
    OPENAI_RESPONSES: _responses_document,
    ANTHROPIC_MESSAGES: _message_document,
}


# --- the response and its paced body ----------------------------------------


@implementer(IConsumer)
class _BodyCollector:
    """Gathers a request body from whatever L{IBodyProducer} treq passes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


@implementer(IPushProducer)
class _EventScheduler:
    """Feeds body chunks to a protocol, one per C{interval}, and is the
    transport the protocol gets, so the relay's flow control acts on it.

    At most one delayed call is pending at any time; pausing cancels it and
    resuming schedules the next chunk a full interval later.
    """

    def __init__(
        self, clock: IReactorTime, interval: float, chunks: Iterable[bytes], protocol: IProtocol
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._chunks = deque(chunks)
        self._protocol = protocol
        self._pending: IDelayedCall | None = None
        self._paused = False
        self._finished = False

    def start(self) -> None:
        self._protocol.makeConnection(self)  # type: ignore[arg-type]
        self._schedule()

    def _schedule(self) -> None:
        if not (self._finished or self._paused or self._pending is not None):
            self._pending = self._clock.callLater(self._interval, self._emit)

    def _emit(self) -> None:
        self._pending = None
        if self._chunks:
            self._protocol.dataReceived(self._chunks.popleft())
        # The protocol may have paused or stopped us from inside dataReceived.
        if self._finished or self._paused:
            return
        if self._chunks:
            self._schedule()
        else:
            self._finish(Failure(ResponseDone()))

    def _finish(self, reason: Failure) -> None:
        self._finished = True
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._chunks.clear()
        self._protocol.connectionLost(reason)

    def pauseProducing(self) -> None:
        self._paused = True
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        """End the body early, the way a dropped upstream connection does."""
        if not self._finished:
            self._finish(Failure(ResponseFailed([Failure(ConnectionDone())])))


@implementer(IResponse)
class _MockResponse:
    """An L{IResponse} whose body is paced by an L{_EventScheduler}."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse: IResponse | None = None

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        code: int,
        headers: Headers,
        chunks: list[bytes],
        length: int | object,
    ) -> None:
        self.code = code
        self.phrase = RESPONSES.get(code, b"Unknown")
        self.headers = headers
        self.length = length
        self._clock = clock
        self._interval = interval
        self._chunks = chunks
        self._delivered = False

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: IProtocol) -> None:
        if self._delivered:
            raise RuntimeError("the body of this response has already been delivered")
        self._delivered = True
        _EventScheduler(self._clock, self._interval, self._chunks, protocol).start()


# --- the agent --------------------------------------------------------------


def _openai_error(message: str, type_: str, code: str | None) -> _Document:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _invalid_request(protocol: str, message: str) -> tuple[int, _Document]:
    if is_anthropic(protocol):
        return 400, {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return 400, _openai_error(message, "invalid_request_error", None)


@implementer(IAgent)
class MockAgent:
    """Answers C{mock://} requests with canned, protocol-correct replies."""

    def __init__(self, clock: IReactorTime, interval: float = 0.02) -> None:
        self._clock = clock
        self._interval = interval

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """Read the body as a real agent would (through C{startProducing}),
        then answer; cancelling before the answer stops the body read."""
        path = urlsplit(uri).path or b"/"
        if bodyProducer is None:
            return succeed(self._respond(method, path, b""))
        producer = bodyProducer  # keeps the not-None narrowing inside the closures
        collector = _BodyCollector()
        result: Deferred[IResponse] = Deferred(lambda _: producer.stopProducing())

        def read(_: object) -> None:
            if not result.called:
                result.callback(self._respond(method, path, b"".join(collector.chunks)))

        def failed(reason: Failure) -> None:
            if not result.called:
                result.errback(reason)

        maybeDeferred(producer.startProducing, collector).addCallbacks(read, failed)
        return result

    def _respond(self, method: bytes, path: bytes, body: bytes) -> _MockResponse:
        protocol = detect(method, path)
        if protocol == MODEL_DISCOVERY:
            if path == b"/v1/models":
                return self._json(200, {"object": "list", "data": [_model(DEFAULT_MODEL)]})
            model_id = unquote_to_bytes(path[len(b"/v1/models/") :]).decode("utf-8", "replace")
            return self._json(200, _model(model_id))
        if protocol is None:
            message = f"No mock route for {method.decode('latin-1')} {path.decode('latin-1')}"
            return self._json(404, _openai_error(message, "not_found_error", "not_found"))
        try:
            request = json.loads(body)
        except ValueError:
            return self._json(*_invalid_request(protocol, "The request body is not valid JSON."))
        if not isinstance(request, dict):
            return self._json(*_invalid_request(protocol, "The request body must be a JSON object."))
        call = _Call(request, int(self._clock.seconds()))
        if path == COUNT_TOKENS_PATH:
            return self._json(200, {"input_tokens": call.input_tokens})
        if protocol == OPENAI_EMBEDDINGS:
            return self._embeddings(protocol, call)
        if request.get("stream") is True:
            headers = Headers(
                {b"content-type": [b"text/event-stream"], b"cache-control": [b"no-cache"]}
            )
            chunks = list(_STREAMS[protocol](call))
            return _MockResponse(self._clock, self._interval, 200, headers, chunks, UNKNOWN_LENGTH)
        return self._json(200, _DOCUMENTS[protocol](call))

    def _embeddings(self, protocol: str, call: _Call) -> _MockResponse:
        inputs = call.body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not (isinstance(inputs, list) and inputs and all(isinstance(i, str) for i in inputs)):
            return self._json(
                *_invalid_request(protocol, "'input' must be a string or a list of strings.")
            )
        data = [
            {"object": "embedding", "index": index, "embedding": _embedding(text)}
            for index, text in enumerate(inputs)
        ]
        usage = {"prompt_tokens": call.input_tokens, "total_tokens": call.input_tokens}
        return self._json(200, {"object": "list", "data": data, "model": call.model, "usage": usage})

    def _json(self, code: int, document: _Document) -> _MockResponse:
        """A complete JSON reply: one chunk, one interval after the body is asked for."""
        body = json.dumps(document, separators=(",", ":")).encode()
        headers = Headers(
            {b"content-type": [b"application/json"], b"content-length": [str(len(body)).encode()]}
        )
        return _MockResponse(self._clock, self._interval, code, headers, [body], len(body))
