"""Bounded decoding of upstream bodies: one gzip layer, bounded steps, backpressure, caps, a checked end."""
from __future__ import annotations

import json
import zlib

import pytest
from twisted.internet.protocol import Protocol
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from navtwist.testing import FakeResponse, Harness, make_harness
from navtwist.upstream.decode import (
    DECODE_ERROR,
    DECODE_LIMIT,
    STEP,
    BodyDecodeError,
    DecodeLimits,
    DecodedResponse,
)

ROUTES = {"routes": [{
    "name": "inference.local", "endpoint": "http://upstream.test/v1", "model": "route-model",
    "protocols": ["openai_chat_completions", "openai_embeddings"], "api_key": "sk-route",
}]}
CHAT = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
EMBED = b'{"input":"x"}'


def gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=31)
    return compressor.compress(data) + compressor.flush()


def zeros_gzip(size: int) -> bytes:
    """A gzip body of C{size} zero bytes, made without holding them."""
    compressor = zlib.compressobj(9, wbits=31)
    block = bytes(min(size, 1024 * 1024))
    assert size % len(block) == 0
    out = [compressor.compress(block) for _ in range(size // len(block))]
    return b"".join(out) + compressor.flush()


class Reader(Protocol):
    """Collects a decoded body and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.chunks: list[int] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.chunks.append(len(data))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason


def gunzip(limits: DecodeLimits = DecodeLimits()) -> tuple[FakeResponse, Reader]:
    """A gzip FakeResponse whose body is decoded into a L{Reader}."""
    response = FakeResponse(headers={b"content-encoding": [b"gzip"]})
    reader = Reader()
    DecodedResponse(response, limits).deliverBody(reader)
    return response, reader


@pytest.fixture
def harness() -> Harness:
    return make_harness(ROUTES)


def _answer(h: Harness, body: bytes, headers: dict[bytes, list[bytes]], request: bytes = CHAT,
            path: str = "/v1/chat/completions") -> FakeResponse:
    h.send("POST", path, request)
    response = FakeResponse(headers=headers)
    h.agent.calls[0].deferred.callback(response)
    return response


SSE_GZIP = {b"content-type": [b"text/event-stream"], b"content-encoding": [b"gzip"]}
JSON_GZIP = {b"content-type": [b"application/json"], b"content-encoding": [b"gzip"]}


def test_upstreams_are_asked_for_identity_only(harness: Harness) -> None:
    harness.send("POST", "/v1/chat/completions", CHAT, Accept_Encoding="gzip, br")
    assert harness.agent.calls[0].headers.getRawHeaders(b"accept-encoding") == [b"identity"]


def test_one_gzip_layer_is_decoded_for_the_client(harness: Harness) -> None:
    response = _answer(harness, b"", SSE_GZIP)
    response.send(gzip(b"data: 1\n\n"))
    response.end()
    out = harness.output()
    assert b"data: 1\n\n" in out and out.endswith(b"0\r\n\r\n")
    assert b"content-encoding" not in out.lower()


@pytest.mark.parametrize("coding", [b"gzip, gzip", b"gzip,x-gzip", b"br", b"deflate", b"gzip, br"])
def test_other_codings_are_refused_before_headers(harness: Harness, coding: bytes) -> None:
    response = _answer(harness, b"", {b"content-type": [b"text/event-stream"], b"content-encoding": [coding]})
    status, document = harness.response_json()
    assert status == 502 and document["error"]["code"] == "upstream_error"
    assert "Content-Encoding" in document["error"]["message"]
    assert response.transport.stopped  # the encoded body is never read


def test_paused_reader_pauses_inflating_not_only_reading() -> None:
    response, reader = gunzip()
    body = zeros_gzip(8 * STEP)
    reader.transport.pauseProducing()
    response.send(body)
    assert reader.data == b"" and response.transport.paused
    reader.transport.resumeProducing()
    assert len(reader.data) == 8 * STEP and max(reader.chunks) <= STEP


def test_reader_pausing_mid_body_holds_one_step_at_most() -> None:
    response, reader = gunzip()

    def pause_after_each_chunk(data: bytes) -> None:
        Reader.dataReceived(reader, data)
        reader.transport.pauseProducing()

    reader.dataReceived = pause_after_each_chunk  # type: ignore[method-assign]
    response.send(zeros_gzip(4 * STEP))
    assert reader.chunks == [STEP] and response.transport.paused
    reader.transport.resumeProducing()
    assert reader.chunks == [STEP, STEP]
    response.end()  # the upstream is done, the reader is not: the end waits for the rest
    assert reader.reason is None
    for _ in range(2):
        reader.transport.resumeProducing()
    reader.transport.resumeProducing()
    assert len(reader.data) == 4 * STEP and reader.reason.check(ResponseDone)


def test_decoded_size_cap_ends_the_body_as_truncated() -> None:
    response, reader = gunzip(DecodeLimits(max_decoded_bytes=3 * STEP, max_ratio=10**6))
    response.send(zeros_gzip(8 * STEP))
    assert len(reader.data) <= 3 * STEP
    assert reader.reason.check(BodyDecodeError) and reader.reason.value.outcome == DECODE_LIMIT
    assert response.transport.stopped


def test_expansion_ratio_cap_stops_a_bomb_early() -> None:
    response, reader = gunzip(DecodeLimits(max_ratio=100))
    response.send(zeros_gzip(64 * 1024 * 1024))  # ~1000:1
    assert reader.reason.check(BodyDecodeError) and reader.reason.value.outcome == DECODE_LIMIT
    assert len(reader.data) <= 2 * 1024 * 1024


@pytest.mark.parametrize("body", [
    pytest.param(b"\x1f\x8b\x08\x00garbage-that-is-not-deflate" * 3, id="corrupt"),
    pytest.param(gzip(b'{"answer": "' + b"x" * 5000 + b'"}')[:40], id="cut-in-half"),
    pytest.param(gzip(b"data: 1\n\n")[:-8], id="no-trailer"),
    pytest.param(gzip(b"data: 1\n\n")[:-1] + bytes([gzip(b"data: 1\n\n")[-1] ^ 0xFF]), id="bad-last-byte"),
    pytest.param(gzip(b"data: 1\n\n") + b"extra", id="data-after-end"),
])
def test_undecodable_or_incomplete_gzip_never_ends_cleanly(body: bytes) -> None:
    response, reader = gunzip()
    response.send(body)
    response.end()
    assert reader.reason.check(BodyDecodeError) and reader.reason.value.outcome == DECODE_ERROR


def test_gzip_sse_without_trailer_ends_with_an_error_event(harness: Harness) -> None:
    response = _answer(harness, b"", SSE_GZIP)
    compressor = zlib.compressobj(wbits=31)
    response.send(compressor.compress(b"data: 1\n\n") + compressor.flush(zlib.Z_SYNC_FLUSH))
    response.end()  # complete chunked framing, no gzip trailer
    out = harness.output()
    assert b"data: 1\n\n" in out
    assert b"response truncated" in out and b"gzip" in out
    assert out.endswith(b"0\r\n\r\n")  # the error event is the stream's last word


def test_truncated_gzip_json_aborts_the_chunked_body(harness: Harness) -> None:
    response = _answer(harness, b"", JSON_GZIP, EMBED, "/v1/embeddings")
    response.send(gzip(b'{"data": [' + b"1," * 4000 + b"1]}")[:60])
    response.end()
    out = harness.output()
    assert not out.endswith(b"0\r\n\r\n")
    assert getattr(harness.transport, "aborted", False) or harness.transport.disconnecting


def test_corrupt_gzip_is_logged_as_an_upstream_error(harness: Harness) -> None:
    with capturedLogs() as events:
        response = _answer(harness, b"", JSON_GZIP, EMBED, "/v1/embeddings")
        response.send(b"\x1f\x8b\x08\x00not deflate at all")
        response.end()
    [record] = [e for e in events if e.get("log_format", "").startswith("request ")]
    assert record["outcome"] == "upstream_error" and record["detail"] == DECODE_ERROR
    assert getattr(harness.transport, "aborted", False) or harness.transport.disconnecting


def test_client_leaving_mid_decode_stops_the_upstream(harness: Harness) -> None:
    response = _answer(harness, b"", SSE_GZIP)
    response.send(gzip(b"data: 1\n\n")[:20])
    harness.disconnect()
    assert response.transport.stopped
    assert not harness.clock.getDelayedCalls()
