"""A hardened twisted.web HTTP/1.1 server channel for the proxy's HTTP modes.

Twisted's HTTPChannel does the parsing (keep-alive, pipelining in order,
100-continue, chunked bodies, CL+TE and duplicate-length refusal).  This
module closes the gaps a security boundary cannot leave open, and makes every
refusal a complete JSON response followed by a close:

- the header rules of L{navtwist.http.head} (obs-fold, names, control characters,
  Content-Length syntax, Transfer-Encoding other than chunked, one Host), shared with
  the proxy's first-head parser so that both read a head the same way;
- chunk sizes over 16 hex digits and malformed trailer lines;
- the head size and header count (431), including a line that never ends;
- the body size (413) via L{CappedRequest};
- a deadline for a request head that has started arriving (408): Twisted's
  idle timeout restarts on every byte, so a client dribbling a head would
  otherwise hold the connection forever.
"""
from __future__ import annotations

import json
from typing import Callable, cast

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from navtwist.compat import ChannelHooks, ChunkedDecoderHooks, MalformedChunkedDataError
from navtwist.config import Limits, Timeouts
from navtwist.decisions import DecisionRecord
from navtwist.egress.tunnel import Splice
from navtwist.interfaces import IStreamTransport
from navtwist.http.head import BadHead, check_framing_header, check_host_count, check_not_folded, parse_header_line
from navtwist.outcome import Refusal
from navtwist.upstream.exchange import log_request, refusal_record

# 16 hex digits are 64 bits: a longer chunk size overflows other parsers.
_MAX_CHUNK_SIZE_DIGITS = 16


def raw_json_response(status: int, document: dict) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for refusals
    made before (or instead of) twisted.web's own response machinery."""
    body = json.dumps(document).encode("utf-8")
    reason = RESPONSES.get(status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason, len(body))
    ) + body


def bad_request(message: str) -> Refusal:
    return Refusal(400, "bad_request", message)


MALFORMED = bad_request("malformed HTTP request")
HEADERS_TOO_LARGE = Refusal(431, "headers_too_large", "request headers too large")
BODY_TOO_LARGE = Refusal(413, "request_too_large", "request body exceeds the proxy's limit")
REQUEST_TIMEOUT = Refusal(408, "request_timeout", "request not received in time")


class _StrictChunkedDecoder(ChunkedDecoderHooks):
    """Twisted's chunked decoder, also refusing over-long chunk sizes and bad trailer lines."""

    def chunk_length_received(self) -> bool:
        size = bytes(self.buffered[: _MAX_CHUNK_SIZE_DIGITS + 1]).split(b";", 1)[0].split(b"\r", 1)[0]
        if len(size) > _MAX_CHUNK_SIZE_DIGITS:
            raise MalformedChunkedDataError("chunk size has more than 16 hex digits")
        return super().chunk_length_received()

    def trailer_received(self) -> bool:
        # Twisted discards trailers unparsed; they must still be well-formed lines.
        seen = len(self.trailer_lines)
        more = super().trailer_received()
        if len(self.trailer_lines) > seen:
            try:
                parse_header_line(bytes(self.trailer_lines[-1]))
            except BadHead as e:
                raise MalformedChunkedDataError(str(e)) from None
        return more


class CappedRequest(Request):
    """A request whose body may not exceed the site's cap: 413, then close.

    A declared Content-Length over the cap is refused before any body byte is
    read (and before C{100 Continue}); a chunked body as soon as it crosses it.
    """

    channel: HardenedChannel

    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.channel.site.limits.max_body_bytes:
            self.channel.refuse(BODY_TOO_LARGE)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel.refused:
            return
        self._received += len(data)
        if self._received > self.channel.site.limits.max_body_bytes:
            self.channel.refuse(BODY_TOO_LARGE)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The chunked decoder may finish the body after a refusal in the same read.
        if not self.channel.refused:
            super().requestReceived(command, path, version)


class HardenedChannel(ChannelHooks):
    """HTTPChannel with the proxy's header rules, limits and head deadline.

    L{HardenedSite.buildProtocol} sets C{maxHeaders}, C{totalHeadersSize},
    C{MAX_LENGTH} and C{headReadTimeout} from the site's limits.
    """

    site: HardenedSite
    transport: IStreamTransport
    intercepted: tuple[str, int]  # inside an intercepted CONNECT: its authority, set by the listener
    # Inside an intercepted CONNECT: hands the connection to a splice (a WebSocket
    # upgrade the origin accepted); set by the listener.
    upgrade: Callable[[IStreamTransport, bytes, DecisionRecord], Splice]
    headReadTimeout: float = Timeouts.head_read
    refused = False
    _head_call: IDelayedCall | None = None
    # The method and path (without query) of the request being read, once its
    # request line is parsed: the site words a refusal for that request's client.
    _target: tuple[bytes, bytes] | None = None

    def refuse(self, refusal: Refusal) -> None:
        """Answer with C{refusal} and close, ignoring whatever else arrives."""
        if self.refused:
            return
        self.refused = True
        self.site.refused(refusal, self._target)
        self._stop_head_deadline()
        # Drop the lines still buffered in this read: a transport may report
        # C{disconnecting} late (TLS does), and they must not be parsed.
        self.discard_buffered_lines()
        if not self.transport.disconnecting:
            headers = self.requests[-1].requestHeaders if self._target is not None and self.requests else None
            document = self.site.error_document(refusal, self._target, headers)
            self.transport.write(raw_json_response(refusal.status, document))
        self.setTimeout(None)
        self.loseConnection()
        # As after Twisted's own timeout: a peer that never reads must not keep the socket.
        self.abort_later()

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if data and self.line_mode:
            self._start_head_deadline()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        try:
            check_not_folded(line)  # Twisted would join the line to the previous header
        except BadHead as e:
            self.refuse(bad_request(str(e)))
            return
        newest = self.requests[-1] if self.requests else None
        super().lineReceived(line)
        if self.requests and self.requests[-1] is not newest:
            # That was a request line, split as Twisted did before accepting it.
            method, _, rest = line.partition(b" ")
            self._target = (method, rest.partition(b" ")[0].partition(b"?")[0])

    def headerReceived(self, line: bytes) -> bool:
        try:
            name, value = parse_header_line(line)
            check_framing_header(name, value, self.request_version)
        except BadHead as e:
            self.refuse(bad_request(str(e)))
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        self._stop_head_deadline()
        try:
            check_host_count(len(self.requests[-1].requestHeaders.getRawHeaders(b"host", [])), self.request_version)
        except BadHead as e:
            self.refuse(bad_request(str(e)))
            return
        self.use_chunked_decoder(_StrictChunkedDecoder)
        super().allHeadersReceived()

    def requestDone(self, request: Request) -> None:
        super().requestDone(request)
        self._target = None
        # The next request's head may already be waiting, part-read, in the line buffer.
        if self.line_mode and self.buffered_lines and not self.refused:
            self._start_head_deadline()

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted would close without a word.
        self.refuse(HEADERS_TOO_LARGE)

    def respond_to_bad_request(self) -> None:
        # Twisted calls this for every parse failure and for its header limits;
        # the limits deserve 431, the rest 400.
        if self.head_over_limits():
            self.refuse(HEADERS_TOO_LARGE)
        else:
            self.refuse(MALFORMED)

    def send_100_continue(self) -> None:
        # A request refused on its declared length must not be told to go on,
        # nor one already answered (a streaming request is rendered first).
        answered = not self.requests or self.requests[-1].startedWriting
        if not self.refused and not answered:
            super().send_100_continue()

    def timeoutConnection(self) -> None:
        """A request stalled mid-way gets a 408; an idle connection is closed as Twisted does."""
        if self.requests or self._head_call is not None:
            self.refuse(REQUEST_TIMEOUT)
        else:
            super().timeoutConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_head_deadline()
        super().connectionLost(reason)

    def _start_head_deadline(self) -> None:
        if self._head_call is None:
            self._head_call = self.callLater(self.headReadTimeout, self._head_timed_out)

    def _stop_head_deadline(self) -> None:
        if self._head_call is not None:
            if self._head_call.active():
                self._head_call.cancel()
            self._head_call = None

    def _head_timed_out(self) -> None:
        self._head_call = None
        self.refuse(REQUEST_TIMEOUT)


class HardenedSite(Site):
    """A twisted.web site whose channels are L{HardenedChannel}s limited by C{limits}.

    Its reactor schedules every timeout (keep-alive idle, head deadline).
    """

    # The bare channel, not Twisted's HTTP/2-negotiating wrapper its annotation names: HTTP/1.1 only.
    protocol = HardenedChannel  # type: ignore[assignment]
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        limits: Limits,
        timeouts: Timeouts,
        reactor: IReactorTime,
        requestFactory: type[Request] = CappedRequest,
    ) -> None:
        # No form parsing: bodies are passed on as bytes, and Twisted's form
        # parser is needless work on a large body and raises on some
        # Content-Type values (a latin-1 NEL, 0x85, is a line break to it).
        super().__init__(
            resource,
            requestFactory=requestFactory,
            parsePOSTFormSubmission=False,
            timeout=timeouts.keepalive_idle,
            reactor=reactor,
        )
        self.limits = limits
        self.timeouts = timeouts

    # Twisted's annotation names its HTTP/2-negotiating wrapper; this site builds the bare channel.
    def buildProtocol(self, addr: IAddress | None) -> HardenedChannel:  # type: ignore[override]
        channel = cast(HardenedChannel, super().buildProtocol(addr))
        channel.maxHeaders = self.limits.max_headers
        # MAX_LENGTH bounds a line still without its CRLF; totalHeadersSize the whole head.
        channel.totalHeadersSize = channel.MAX_LENGTH = self.limits.max_head_bytes
        channel.headReadTimeout = self.timeouts.head_read
        return channel

    def refused(self, refusal: Refusal, target: tuple[bytes, bytes] | None) -> None:
        """Log a refusal a channel made itself (413, 431, 408, 400) as one request record."""
        now = self.reactor.seconds()
        log_request(refusal_record({}, refusal, now, now))

    def error_document(self, refusal: Refusal, target: tuple[bytes, bytes] | None, headers: Headers | None) -> dict:
        """The JSON body of a refusal of the request to C{target} (method, path;
        None before its request line) with the C{headers} read so far; this is
        the proxy's own C{{"error", "detail"}} shape."""
        return {"error": refusal.code, "detail": refusal.message}
