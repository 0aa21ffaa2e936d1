"""Bounded decoding of upstream response bodies (at most one gzip layer).

Inference routes ask upstreams for C{Accept-Encoding: identity}, because the
usage meter and stream observers need plaintext.  An upstream that compresses
anyway gets exactly one layer decoded: C{gzip} (or C{x-gzip}).  Any other
C{Content-Encoding} value (several layers, C{br}, C{deflate}, unknown tokens)
is refused before the client sees a status: the call fails with
L{UnsupportedContentEncoding} and the client gets a 502 (or the next fallback
candidate is tried).

The decoder inflates in steps of at most L{STEP} bytes and stops when the
client stops reading: the compressed bytes not yet inflated wait in the
decompressor (C{unconsumed_tail}) and the upstream is paused, so a slow reader
holds at most one step of decoded data, however well the body compresses.  It
caps the decoded size and the expansion ratio of each response, checks that
the gzip stream really ended, and reports any failure as a truncated body.
"""
from __future__ import annotations

import zlib

from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from navtwist.outcome import Outcome
from navtwist.upstream.body import Discard

log = Logger(namespace="navtwist.decode")

STEP = 64 * 1024  # the most decoded bytes produced per decompress() call
RATIO_GRACE = 1024 * 1024  # decoded bytes allowed before the ratio cap applies
GZIP_TOKENS = frozenset({b"gzip", b"x-gzip"})

# Outcomes (request log C{detail}) of a body that could not be decoded.
DECODE_ERROR = Outcome.UPSTREAM_DECODE_ERROR
DECODE_LIMIT = Outcome.UPSTREAM_DECODE_LIMIT


@dataclass(frozen=True)
class DecodeLimits:
    """Caps on one decoded response body (C{limits.max_decoded_bytes}, C{limits.max_decompression_ratio})."""

    max_decoded_bytes: int = 256 * 1024 * 1024
    max_ratio: int = 100


class UnsupportedContentEncoding(Exception):
    """The upstream used a content coding the proxy does not decode (one gzip layer at most)."""

    def __init__(self, value: bytes) -> None:
        super().__init__("upstream used an unsupported Content-Encoding (at most one gzip layer is decoded)")
        self.value = value


class BodyDecodeError(Exception):
    """The body could not be decoded, or decoding it passed a limit: it ends as a truncated body.

    C{outcome} is the request log's detail for it.
    """

    def __init__(self, message: str, outcome: str = DECODE_ERROR) -> None:
        super().__init__(message)
        self.outcome = outcome


def content_codings(headers: Headers) -> list[bytes]:
    """The response's content codings, outermost last; C{identity} and empty entries dropped."""
    tokens = b",".join(headers.getRawHeaders(b"content-encoding", [])).split(b",")
    return [t for t in (token.strip().lower() for token in tokens) if t and t != b"identity"]


@implementer(IAgent)
class DecodingAgent:
    """Asks for identity bodies and decodes a single gzip layer in bounded steps."""

    def __init__(self, agent: IAgent, limits: DecodeLimits) -> None:
        self._agent = agent
        self._limits = limits

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None
    ) -> Deferred[IResponse]:
        headers = Headers() if headers is None else headers.copy()
        headers.setRawHeaders(b"accept-encoding", [b"identity"])
        return self._agent.request(method, uri, headers, bodyProducer).addCallback(self._decoded)

    def _decoded(self, response: IResponse) -> IResponse:
        codings = content_codings(response.headers)
        if not codings:
            return response
        if len(codings) == 1 and codings[0] in GZIP_TOKENS:
            return DecodedResponse(response, self._limits)
        response.deliverBody(Discard())
        value = b", ".join(codings)
        log.warn("upstream answer refused: Content-Encoding {value}", value=value[:64].decode("latin-1"))
        raise UnsupportedContentEncoding(value)


class DecodedResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """A gzip response as its decoded body: no Content-Encoding, length unknown."""

    def __init__(self, original: IResponse, limits: DecodeLimits) -> None:
        super().__init__(original)
        self._limits = limits
        self.headers = original.headers.copy()
        self.headers.removeHeader(b"content-encoding")
        self.length = UNKNOWN_LENGTH

    def deliverBody(self, protocol: Protocol) -> None:
        self.original.deliverBody(BoundedGunzip(protocol, self._limits))


@implementer(IPushProducer)
class BoundedGunzip(Protocol):
    """Inflates a gzip body into C{protocol} step by step, as fast as C{protocol} takes it.

    It is C{protocol}'s transport: pausing it stops inflating (and pauses the
    upstream); resuming it inflates what is waiting before reading more.
    """

    # A body's transport is only an IPushProducer (IResponse.deliverBody), not the ITransport Protocol declares.
    transport: IPushProducer  # type: ignore[assignment]

    def __init__(self, protocol: Protocol, limits: DecodeLimits) -> None:
        self._protocol = protocol
        self._limits = limits
        self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._pending = b""  # compressed input not yet inflated
        self._more = False  # the last step was full: the inflater may hold more output
        self._paused = False
        self._stopped = False
        self._end: Failure | None = None  # the upstream's end, kept until all pending input is inflated
        self._ended = False
        self.compressed = 0
        self.decoded = 0

    # -- from the upstream

    def connectionMade(self) -> None:
        self._protocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        if self._ended or self._stopped:
            return
        self.compressed += len(data)
        self._pending += data
        self._inflate()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._ended:
            return
        self._end = reason
        self._inflate()

    # -- from the reader

    def pauseProducing(self) -> None:
        if self._paused or self._ended:
            return
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._paused or self._ended:
            return
        self._paused = False
        self._inflate()
        if not self._paused and not self._ended and self._end is None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self._stopped or self._ended:
            return
        self._stopped = True
        self._pending = b""
        self.transport.stopProducing()

    # -- inflating

    def _inflate(self) -> None:
        """Inflate pending input while the reader takes it; then finish if the upstream ended."""
        while (self._pending or self._more) and not self._paused and not self._ended and not self._stopped:
            try:
                chunk = self._inflater.decompress(self._pending, STEP)
            except zlib.error as e:
                self._fail(BodyDecodeError(f"upstream sent an invalid gzip body ({e})"))
                return
            self._pending = self._inflater.unconsumed_tail
            self._more = len(chunk) == STEP
            if self._inflater.unused_data or (self._inflater.eof and self._pending):
                self._fail(BodyDecodeError("upstream sent data after the end of its gzip body"))
                return
            self.decoded += len(chunk)
            limit = self._over_limit()
            if limit is not None:
                self._fail(BodyDecodeError(limit, DECODE_LIMIT))
                return
            if chunk:
                self._protocol.dataReceived(chunk)
        if self._end is not None and not self._pending and not self._more and not self._ended:
            self._finish(self._end)

    def _over_limit(self) -> str | None:
        limits = self._limits
        if self.decoded > limits.max_decoded_bytes:
            return f"decoded body exceeds limits.max_decoded_bytes ({limits.max_decoded_bytes})"
        consumed = self.compressed - len(self._pending)
        if self.decoded > RATIO_GRACE and self.decoded > limits.max_ratio * max(consumed, 1):
            return f"gzip body expands more than limits.max_decompression_ratio ({limits.max_ratio}:1)"
        return None

    def _finish(self, reason: Failure) -> None:
        if self._stopped:
            self._deliver_end(reason)
        elif reason.check(ResponseDone, PotentialDataLoss) and not self._inflater.eof:
            self._fail(BodyDecodeError("upstream's gzip body ended before its end (truncated)"), stop=False)
        else:
            self._deliver_end(reason)

    def _fail(self, error: BodyDecodeError, stop: bool = True) -> None:
        log.warn("upstream body refused: {error}", error=str(error))
        self._pending = b""
        self._ended = True  # before stopping: the upstream's own end that follows is ignored
        if stop and self._end is None:
            self.transport.stopProducing()  # the connection is not reused
        self._protocol.connectionLost(Failure(error))

    def _deliver_end(self, reason: Failure) -> None:
        self._ended = True
        self._protocol.connectionLost(reason)
