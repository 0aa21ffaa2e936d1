"""The HTTP/1.1 server that runs inside an intercepted TLS connection.

Twisted's HTTPChannel does the parsing (keep-alive, pipelining in order,
100-continue, strict chunked bodies, CL+TE refusal); this module adds the
proxy's limits and makes every refusal a JSON answer instead of a bare 400.
"""
from __future__ import annotations

import json

from twisted.internet.interfaces import IReactorTime
from twisted.web.http import HTTPChannel, RESPONSES
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from navtwist.config import Limits


def raw_json_response(status: int, document: dict) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for refusals
    made before (or instead of) twisted.web's own response machinery."""
    body = json.dumps(document).encode("utf-8")
    reason = RESPONSES.get(status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason, len(body))
    ) + body


class InterceptRequest(Request):
    """A request whose body may not exceed the site's cap (413, then close)."""

    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.channel.site.max_body_bytes:
            self._refuse_too_large()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body_bytes:
            self._refuse_too_large()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse_too_large(self) -> None:
        self._refused = True
        self.channel.refuse(
            413,
            {"error": {"message": "request body exceeds the proxy's limit",
                       "type": "invalid_request_error", "code": "request_too_large"}},
        )


class InterceptChannel(HTTPChannel):
    """HTTPChannel whose refusals are JSON and say which limit was hit."""

    def refuse(self, status: int, document: dict) -> None:
        """Answer with C{status} and close, ignoring whatever else arrives."""
        if self.transport.disconnecting:
            return
        self.transport.write(raw_json_response(status, document))
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted calls this for every parse failure and for its header limits;
        # the limits deserve 431, the rest 400.
        if self._receivedHeaderCount > self.maxHeaders or self._receivedHeaderSize > self.totalHeadersSize:
            self.refuse(431, {"error": {"message": "request headers too large",
                                        "type": "invalid_request_error", "code": "headers_too_large"}})
        else:
            self.refuse(400, {"error": {"message": "malformed HTTP request",
                                        "type": "invalid_request_error", "code": "bad_request"}})

    def _send100Continue(self) -> None:
        # A request refused on its declared length must not be told to go on.
        if not self.transport.disconnecting:
            super()._send100Continue()


class InterceptSite(Site):
    """The twisted.web site behind each intercepted inference.local connection."""

    protocol = InterceptChannel
    displayTracebacks = False

    def __init__(self, resource: IResource, limits: Limits, keepalive_idle: float, reactor: IReactorTime) -> None:
        super().__init__(resource, requestFactory=InterceptRequest, timeout=keepalive_idle, reactor=reactor)
        self.max_body_bytes = limits.max_body_bytes
        self._limits = limits

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        channel = super().buildProtocol(addr)
        channel.maxHeaders = self._limits.max_headers
        channel.totalHeadersSize = self._limits.max_head_bytes
        return channel
