"""Passive token-usage and first-token accounting for relayed inference responses.

The relay hands every chunk to a L{UsageMeter} only after writing it to the
client, so accounting can never delay delivery.  The meter parses the body on
the side: server-sent events are framed incrementally (a chunk may end
anywhere, even inside a line terminator or a multibyte character), only the
current incomplete event is kept, and that is capped, so memory stays bounded
however long the stream runs.  Event payloads are JSON-decoded only when a
cheap byte test says they may matter (a possible first token, or a usage
object), because this runs for every chunk of every response.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from navtwist.inference.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT_COMPLETIONS,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
)


@dataclass
class Usage:
    """What one response cost, and when its first token passed through."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    first_token_at: float | None = None  # clock time of the first content event
    events: int = 0  # SSE events dispatched (blocks that carry a data field)
    oversized_events: int = 0  # events longer than the cap, skipped unread
    complete: bool = False  # the stream's final event went through


_Document = dict[str, Any]
_Tokens = tuple[int | None, int | None]
# What one decoded stream event says: is it content, and which token counts it reports.
_Reading = tuple[bool, int | None, int | None]

# An event ends at an empty line: two line terminators in a row.  CRLF is one
# terminator, so a CR counts alone only when no LF follows; a CR at the very
# end of the buffer counts, and the meter drops an LF that opens the next chunk.
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n){2}")
# A boundary is at most 4 bytes, so 3 bytes of what was already scanned are
# enough to find one that straddles two chunks.
_CARRY = 3


def _find_lf_boundary(buffer: bytearray, start: int) -> tuple[int, int] | None:
    at = buffer.find(b"\n\n", start)
    return None if at < 0 else (at, at + 2)


def _find_any_boundary(buffer: bytearray, start: int) -> tuple[int, int] | None:
    match = _BOUNDARY.search(buffer, start)
    return None if match is None else match.span()


def _boundary_finder(buffer: bytearray, start: int) -> Callable[[bytearray, int], tuple[int, int] | None]:
    """How to find event ends in C{buffer[start:]}: with a memchr-speed search for LF LF
    when it holds no CR (nearly every stream), else with the general pattern, which is
    ten times slower."""
    return _find_any_boundary if buffer.find(b"\r", start) >= 0 else _find_lf_boundary


# A usage object, as opposed to the "usage":null OpenAI repeats in every chunk
# when include_usage is set.  An escaped quote inside a string cannot match.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')

_OPENAI_INPUT = ("prompt_tokens",)
_RESPONSES_INPUT = ("input_tokens",)
# Anthropic's input_tokens excludes cached input; the whole prompt is the sum.
_ANTHROPIC_INPUT = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_CHAT_CONTENT = ("content", "tool_calls", "reasoning_content", "refusal")


def _int(value: Any) -> int | None:
    """A token count, or None for anything that is not one (bools, floats, strings)."""
    return value if type(value) is int and value >= 0 else None


def _count(usage: Any, input_keys: tuple[str, ...], output_key: str) -> _Tokens:
    """Input (the sum of C{input_keys} present) and output counts from a usage object."""
    if not isinstance(usage, dict):
        return None, None
    inputs = [n for n in map(_int, map(usage.get, input_keys)) if n is not None]
    return (sum(inputs) if inputs else None), _int(usage.get(output_key))


def _choices(doc: _Document) -> list[dict[str, Any]]:
    choices = doc.get("choices")
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


# --- readers for whole documents (non-streaming bodies) ---------------------


def _openai_body(doc: _Document) -> _Tokens:
    """Chat, completions and embeddings (which has no completion_tokens)."""
    return _count(doc.get("usage"), _OPENAI_INPUT, "completion_tokens")


def _responses_body(doc: _Document) -> _Tokens:
    return _count(doc.get("usage"), _RESPONSES_INPUT, "output_tokens")


def _anthropic_body(doc: _Document) -> _Tokens:
    return _count(doc.get("usage"), _ANTHROPIC_INPUT, "output_tokens")


_BODY_READERS: dict[str, Callable[[_Document], _Tokens]] = {
    OPENAI_RESPONSES: _responses_body,
    ANTHROPIC_MESSAGES: _anthropic_body,
}


# --- readers for stream events ----------------------------------------------


def _chat_event(doc: _Document) -> _Reading:
    """The role-only opening chunk has an empty content, so it is not content."""
    content = any(
        isinstance(delta := choice.get("delta"), dict) and any(delta.get(k) for k in _CHAT_CONTENT)
        for choice in _choices(doc)
    )
    return (content, *_openai_body(doc))


def _completion_event(doc: _Document) -> _Reading:
    return (any(choice.get("text") for choice in _choices(doc)), *_openai_body(doc))


def _responses_event(doc: _Document) -> _Reading:
    """Usage rides on the final response object (completed, incomplete or failed)."""
    kind = doc.get("type")
    content = isinstance(kind, str) and kind.endswith(".delta") and bool(doc.get("delta"))
    response = doc.get("response")
    return (content, *(_responses_body(response) if isinstance(response, dict) else (None, None)))


def _anthropic_event(doc: _Document) -> _Reading:
    """message_start gives the input; message_delta's counts are cumulative, so the last wins.

    message_start's output_tokens is a placeholder, so output comes from message_delta only.
    """
    kind = doc.get("type")
    if kind == "message_start":
        message = doc.get("message")
        input_tokens, _ = _anthropic_body(message) if isinstance(message, dict) else (None, None)
        return False, input_tokens, None
    if kind == "message_delta":
        return (False, *_anthropic_body(doc))
    return kind == "content_block_delta", None, None


# Per streaming protocol: bytes every content event's data contains, and its reader.
_STREAM_READERS: dict[str, tuple[bytes, Callable[[_Document], _Reading]]] = {
    OPENAI_CHAT_COMPLETIONS: (b'"delta"', _chat_event),
    OPENAI_COMPLETIONS: (b'"text"', _completion_event),
    OPENAI_RESPONSES: (b'.delta"', _responses_event),
    ANTHROPIC_MESSAGES: (b'"content_block_delta"', _anthropic_event),
}


# Per streaming protocol: how its final event can be told, by a cheap byte test.
_FINAL_EVENTS: dict[str, Callable[[bytes], bool]] = {
    OPENAI_CHAT_COMPLETIONS: lambda data: data.strip() == b"[DONE]",
    OPENAI_COMPLETIONS: lambda data: data.strip() == b"[DONE]",
    OPENAI_RESPONSES: lambda data: b'"response.completed"' in data,
    ANTHROPIC_MESSAGES: lambda data: b'"message_stop"' in data,
}


def _event_data(block: bytes | bytearray) -> bytes | None:
    """The data field of one event block (lines joined with LF), or None if it has none.

    Event names are not needed: the APIs that name their events repeat the
    name as the payload's C{type}.
    """
    lines = []
    for line in block.splitlines():  # bytes.splitlines splits on CRLF, CR and LF only
        name, _, value = line.partition(b":")
        if name == b"data":  # the optional space after the colon is JSON whitespace
            lines.append(value)
    return b"\n".join(lines) if lines else None


def _decode(data: bytes | bytearray) -> _Document | None:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, absurd nesting
        return None
    return doc if isinstance(doc, dict) else None


class UsageMeter:
    """Fed every relayed chunk; knows the protocol's usage conventions.

    C{max_body} caps what is held: the current incomplete event of a stream,
    or the whole body of a non-streaming response.
    """

    def __init__(
        self, protocol: str, streaming: bool, clock: Callable[[], float], max_body: int = 1 << 20
    ) -> None:
        self._clock = clock
        self._max = max_body
        self._usage = Usage()
        self._buffer: bytearray | None = bytearray()  # None: a body over the cap was given up
        self._skipping = False  # inside an oversized event, discarding up to its end
        self._lf_pending = False  # the last boundary ended in a CR that may be half a CRLF
        self._stream_reader = _STREAM_READERS.get(protocol)
        self._is_final = _FINAL_EVENTS.get(protocol)
        self._body_reader = _BODY_READERS.get(protocol, _openai_body)
        self._streaming = streaming

    def feed(self, chunk: bytes) -> None:
        """Observe one chunk already written to the client; O(len(chunk)), never raises."""
        if self._streaming:
            self._feed_stream(chunk)
        else:
            self._feed_body(chunk)

    def finish(self) -> Usage:
        """The body has ended: parse a non-streaming body now.

        An incomplete final event is dropped, as the SSE rules require.
        """
        buffer = self._buffer
        self._buffer = None
        if not self._streaming and buffer:
            doc = _decode(buffer)
            if doc is not None:
                self._usage.input_tokens, self._usage.output_tokens = self._body_reader(doc)
        return self._usage

    def _feed_body(self, chunk: bytes) -> None:
        if chunk and self._usage.first_token_at is None:
            self._usage.first_token_at = self._clock()
        buffer = self._buffer
        if buffer is None:
            return
        if len(buffer) + len(chunk) > self._max:
            self._buffer = None
        else:
            buffer += chunk

    def _feed_stream(self, chunk: bytes) -> None:
        buffer = self._buffer
        if buffer is None:
            return
        if self._lf_pending and chunk[:1] == b"\n":
            chunk = chunk[1:]
        start = max(len(buffer) - _CARRY, 0)
        buffer += chunk
        find = _boundary_finder(buffer, start)
        event_start = 0
        while (boundary := find(buffer, start)) is not None:
            block_end, start = boundary
            if self._skipping:
                self._skipping = False
            elif block_end - event_start > self._max:
                self._usage.oversized_events += 1
            else:
                self._event(buffer[event_start:block_end])
            event_start = start
        self._lf_pending = event_start == len(buffer) and buffer[-1:] == b"\r"
        del buffer[:event_start]
        if not self._skipping and len(buffer) > self._max + _CARRY:
            self._skipping = True  # over the cap whatever ends it: skip to its end
            self._usage.oversized_events += 1
        if self._skipping:
            del buffer[:-_CARRY]

    def _event(self, block: bytearray) -> None:
        """Dispatch one complete event, decoding it only if it may matter."""
        data = _event_data(block)
        if data is None:  # comments only
            return
        usage = self._usage
        usage.events += 1
        if self._is_final is not None and self._is_final(data):
            usage.complete = True
        if self._stream_reader is None:
            return
        content_marker, read = self._stream_reader
        if not (
            (usage.first_token_at is None and content_marker in data)
            or _USAGE_OBJECT.search(data) is not None
        ):
            return
        doc = _decode(data)
        if doc is None:
            return
        content, input_tokens, output_tokens = read(doc)
        if content and usage.first_token_at is None:
            usage.first_token_at = self._clock()
        if input_tokens is not None:
            usage.input_tokens = input_tokens
        if output_tokens is not None:
            usage.output_tokens = output_tokens
