"""Every private Twisted name navtwist uses, behind one wall checked at import.

The hardened HTTP channel refuses request smuggling by overriding private
hooks of twisted.web's C{HTTPChannel} and chunked decoder.  Were a Twisted
release to rename one, the override would silently stop being called and
Twisted's more lenient default would take its place: a security regression
with every test of the happy path still green.  So this module checks each
hook when it is imported (names, signatures, and the attributes Twisted
sets, by driving a channel and a decoder once) and refuses to import, naming
the missing hook and the supported Twisted range, rather than run without it.

Nothing else in navtwist may use a private Twisted name: the rest of the code
uses the owned names below (L{ChannelHooks}, L{ChunkedDecoderHooks},
L{MalformedChunkedDataError}, L{set_pool_factory}, L{IdleCappedPoolHooks},
L{accept_exhausted}, L{accept_exhaustion_line}).
"""
from __future__ import annotations

import inspect
from types import ModuleType, SimpleNamespace
from typing import Any, Callable

import twisted
from twisted.internet import _newtls, abstract, tcp
from twisted.web import _newclient as newclient
from twisted.web import client, http
from twisted.web.http_headers import Headers

# Keep in step with the twisted requirement in pyproject.toml.
SUPPORTED_TWISTED = ">=25.5.0,<27"
# What twisted.internet.tcp._accept logs when accept() finds no descriptor (it survives and retries).
_ACCEPT_EXHAUSTED_TEXTS = ("EMFILE encountered;", "Could not accept new connection ({acceptError})")
# The rest of its EMFILE recovery: one line per client it closes, one when it re-reserves.
_ACCEPT_RECOVERY_TEXTS = ("EMFILE recovery:", "Re-reserving EMFILE recovery file descriptor.")


class TwistedIncompatible(ImportError):
    """The installed Twisted lacks a private hook navtwist's defences rely on."""


def _method(owner: type, name: str, params: tuple[str, ...]) -> str | None:
    """Why C{owner.name} is not a method taking C{params} after C{self}, or None."""
    function = getattr(owner, name, None)
    if not callable(function):
        return f"{owner.__module__}.{owner.__qualname__}.{name} is missing"
    found = tuple(inspect.signature(function).parameters)[1:]
    if found != params:
        return f"{owner.__module__}.{owner.__qualname__}.{name} takes {found}, not {params}"
    return None


def _probe(what: str, run: Callable[[], object], expected: object) -> str | None:
    """Why C{run()} (reading a private attribute Twisted sets) is not C{expected}, or None."""
    try:
        found = run()
    except Exception as e:  # an AttributeError above all, but any failure means the same
        return f"{what} is missing ({type(e).__name__}: {e})"
    return None if found == expected else f"{what} is {found!r}, not {expected!r}"


def problems(web_http: ModuleType = http, web_client: ModuleType = client) -> list[str]:
    """Every private hook navtwist needs that these Twisted modules lack, one line each."""
    found: list[str] = []
    for module, name in ((web_http, "_ChunkedTransferDecoder"), (web_http, "_MalformedChunkedDataError"),
                         (web_client, "_HTTP11ClientFactory")):
        if not isinstance(getattr(module, name, None), type):
            found.append(f"{module.__name__}.{name} is missing")
    if found:
        return found
    channel, decoder = web_http.HTTPChannel, web_http._ChunkedTransferDecoder
    checks = [
        _method(channel, "_respondToBadRequestAndDisconnect", ()),
        _method(channel, "_send100Continue", ()),
        _method(decoder, "_dataReceived_CHUNK_LENGTH", ()),
        _method(decoder, "_dataReceived_TRAILER", ()),
        _method(web_client._HTTP11ClientFactory, "__init__", ("quiescentCallback", "metadata")),
        _probe("twisted.web.client.HTTPConnectionPool._factory",
               lambda: web_client.HTTPConnectionPool._factory, web_client._HTTP11ClientFactory),
        _probe("twisted.web.http.HTTPChannel._abortingCall", lambda: channel._abortingCall, None),
        _probe("twisted.web._newclient.HTTPClientParser.state", lambda: newclient.STATUS, "STATUS"),
        _probe("twisted.web._newclient.HEADER", lambda: newclient.HEADER, "HEADER"),
        _method(newclient.HTTP11ClientProtocol, "request", ("request",)),
        _probe("twisted.web.client._HTTP11ClientFactory._quiescentCallback",
               lambda: "_quiescentCallback" in inspect.getsource(web_client._HTTP11ClientFactory.__init__), True),
        _probe("twisted.web._newclient.HTTP11ClientProtocol._parser",
               lambda: "self._parser" in inspect.getsource(newclient.HTTP11ClientProtocol.request), True),
        _probe("twisted.internet.abstract.FileDescriptor write buffer (dataBuffer, offset, _tempDataLen)",
               lambda: all(f"self.{name}" in inspect.getsource(abstract.FileDescriptor)
                           for name in ("dataBuffer", "offset", "_tempDataLen")),
               True),
        _method(_newtls._BypassTLS, "loseConnection", ("args", "kwargs")),
        _probe("twisted.internet._newtls.ConnectionMixin.TLS", lambda: _newtls.ConnectionMixin.TLS, False),
        _method(web_client.HTTPConnectionPool, "_putConnection", ("key", "connection")),
        _probe("twisted.web.client.HTTPConnectionPool._connections",
               lambda: web_client.HTTPConnectionPool(None)._connections, {}),
        _probe("twisted.internet.tcp._accept's EMFILE log events",
               lambda: all(text in inspect.getsource(tcp._accept)
                                   for text in _ACCEPT_EXHAUSTED_TEXTS + _ACCEPT_RECOVERY_TEXTS), True),
        _probe("twisted.protocols.basic.LineReceiver._buffer (the unparsed bytes)",
               lambda: _fed_channel(channel, b"GET / HT")._buffer, b"GET / HT"),
    ]
    # A request line and one header, as the channel's parser sees them.
    head = _fed_channel(channel)
    head.requestFactory = lambda channel, queued: SimpleNamespace(
        requestHeaders=Headers(), handleContentChunk=lambda data: None)
    try:
        head.lineReceived(b"GET / HTTP/1.1")
        head.headerReceived(b"Transfer-Encoding: chunked")
    except Exception as e:
        checks.append(f"twisted.web.http.HTTPChannel cannot parse a head ({type(e).__name__}: {e})")
    else:
        checks += [
            _probe("twisted.web.http.HTTPChannel._version", lambda: head._version, b"HTTP/1.1"),
            _probe("twisted.web.http.HTTPChannel._command", lambda: head._command, b"GET"),
            _probe("twisted.web.http.HTTPChannel._path", lambda: head._path, b"/"),
            _probe("twisted.web.http.HTTPChannel._receivedHeaderCount", lambda: head._receivedHeaderCount, 1),
            _probe("twisted.web.http.HTTPChannel._receivedHeaderSize", lambda: head._receivedHeaderSize, 14),
            _probe("twisted.web.http.HTTPChannel._transferDecoder",
                   lambda: type(head._transferDecoder), web_http._ChunkedTransferDecoder),
        ]
    # A chunked body with one trailer line, as the decoder sees it.
    body = decoder(lambda data: None, lambda rest: None)
    try:
        body.dataReceived(b"1\r\na\r\n0\r\nx: y\r\n\r\n")
    except Exception as e:
        checks.append(f"twisted.web.http._ChunkedTransferDecoder cannot decode ({type(e).__name__}: {e})")
    else:
        checks += [
            _probe("twisted.web.http._ChunkedTransferDecoder._trailerHeaders", lambda: body._trailerHeaders, [b"x: y"]),
            _probe("twisted.web.http._ChunkedTransferDecoder._buffer", lambda: type(body._buffer), bytearray),
        ]
    return found + [problem for problem in checks if problem is not None]


def _fed_channel(channel: type, data: bytes = b"") -> Any:
    """A channel without a transport, after C{data}."""
    probe = channel()
    probe.dataReceived(data)
    return probe


def check(**modules: ModuleType) -> None:
    """Refuse (L{TwistedIncompatible}) if any hook is missing; C{modules} as for L{problems}."""
    missing = problems(**modules)
    if missing:
        raise TwistedIncompatible(
            f"navtwist cannot run on Twisted {twisted.__version__} (supported: {SUPPORTED_TWISTED}): "
            + "; ".join(missing)
            + ". Its HTTP hardening depends on these, and it refuses to start without them."
        )


check()

# --- the owned names, for the rest of navtwist -------------------------------------------

MalformedChunkedDataError: type[Exception] = http._MalformedChunkedDataError


class ChunkedDecoderHooks(http._ChunkedTransferDecoder):
    """Twisted's chunked decoder with its private state hooks under owned names."""

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        return self.chunk_length_received()

    def _dataReceived_TRAILER(self) -> bool:
        return self.trailer_received()

    def chunk_length_received(self) -> bool:
        """Parse a chunk-size line from L{buffered}; False while more bytes are needed."""
        return bool(super()._dataReceived_CHUNK_LENGTH())

    def trailer_received(self) -> bool:
        """Parse a trailer line (appended to L{trailer_lines}); False while more bytes are needed."""
        return bool(super()._dataReceived_TRAILER())

    @property
    def buffered(self) -> bytearray:
        """The bytes received and not yet parsed."""
        return self._buffer

    @property
    def trailer_lines(self) -> list[bytearray]:
        """The raw trailer lines so far (Twisted does not parse them)."""
        return self._trailerHeaders


class ChannelHooks(http.HTTPChannel):
    """Twisted's HTTP server channel with the private parts navtwist uses under owned names."""

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.respond_to_bad_request()

    def _send100Continue(self) -> None:
        self.send_100_continue()

    def respond_to_bad_request(self) -> None:
        """Twisted's answer to every parse failure and to its header limits."""
        super()._respondToBadRequestAndDisconnect()

    def send_100_continue(self) -> None:
        """Tell a client waiting with C{Expect: 100-continue} to send the body."""
        super()._send100Continue()

    def request_line(self) -> tuple[bytes, bytes, bytes]:
        """The method, request-target and version of the request whose head was just read."""
        return self._command, self._path, self._version

    @property
    def request_version(self) -> bytes:
        """The HTTP version of the request line being parsed."""
        return self._version

    def head_over_limits(self) -> bool:
        """Whether the head being parsed has more headers or bytes than the channel allows."""
        return bool(self._receivedHeaderCount > self.maxHeaders or self._receivedHeaderSize > self.totalHeadersSize)

    @property
    def buffered_lines(self) -> bytes:
        """The bytes received and not yet parsed (in line mode, a part-read head)."""
        return self._buffer

    def discard_buffered_lines(self) -> None:
        """Drop the bytes received and not yet parsed, so that none of them is parsed."""
        self._buffer = b""

    def abort_later(self) -> None:
        """Abort the connection after C{abortTimeout} unless it closes first, as
        Twisted's own timeout does (and with the call Twisted cancels on close)."""
        self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def use_chunked_decoder(self, decoder: type[ChunkedDecoderHooks]) -> None:
        """Decode a chunked body of the request being parsed with C{decoder}."""
        current = self._transferDecoder
        if type(current) is http._ChunkedTransferDecoder:
            self._transferDecoder = decoder(current.dataCallback, current.finishCallback)


# --- the HTTP client: response-head caps and the pool's protocol factory -----------------

CLIENT_STATUS, CLIENT_HEADER = newclient.STATUS, newclient.HEADER


class ClientProtocolHooks(newclient.HTTP11ClientProtocol):
    """Twisted's HTTP/1.1 client connection, with its response parser reachable."""

    @property
    def response_parser(self) -> Any:
        """The parser of the response being read (an C{HTTPClientParser}), or None."""
        return getattr(self, "_parser", None)


class ClientFactoryHooks(client._HTTP11ClientFactory):
    """The pool's connection factory (no "Starting factory" log line per connection)."""

    noisy = False

    @property
    def quiescent_callback(self) -> Any:
        return self._quiescentCallback


def set_pool_factory(pool: client.HTTPConnectionPool, factory: type[ClientFactoryHooks]) -> None:
    """Make C{pool} build its connections with C{factory} (Twisted's documented
    hook for this is a private attribute)."""
    pool._factory = factory


def write_buffered(transport: object) -> int | None:
    """Bytes a Twisted C{FileDescriptor} transport holds unsent, or None for another kind."""
    buffered = getattr(transport, "dataBuffer", None)
    if not isinstance(buffered, bytes):
        return None
    return len(buffered) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


def close_beneath_tls(transport: object) -> bool:
    """Close a TCP connection that TLS was started on (C{startTLS}) once the bytes
    it buffers are sent, without waiting for the peer's close_notify.

    Twisted's TLS layer, asked to close, sends close_notify and then waits for
    the peer's, which an idle keep-alive client never sends.  The layer below
    it (a private C{_BypassTLS}) closes the socket itself.  Returns False,
    doing nothing, for a transport that is not TLS started that way.
    """
    below = getattr(getattr(transport, "protocol", None), "transport", None)
    if not getattr(transport, "TLS", False) or not isinstance(below, _newtls._BypassTLS):
        return False
    below.loseConnection()
    return True


# --- descriptor exhaustion: the pool's idle connections, the listener's accept loop -------


class IdleCappedPoolHooks(client.HTTPConnectionPool):
    """A pool that keeps a connection that went idle only while C{admits()} (a cap over many pools)."""

    admits: Callable[[], bool] = staticmethod(lambda: True)

    def idle_count(self) -> int:
        """Idle connections this pool holds now."""
        return sum(len(connections) for connections in self._connections.values())

    def _putConnection(self, key: Any, connection: Any) -> None:
        if not self.admits():
            connection.transport.loseConnection()  # what Twisted does beyond maxPersistentPerHost
            return
        super()._putConnection(key, connection)


def accept_exhausted(event: Any) -> bool:
    """Whether a log event is Twisted's listener failing to accept for want of a descriptor."""
    text = event.get("log_format")
    if isinstance(text, str) and text.startswith(_ACCEPT_EXHAUSTED_TEXTS[0]):
        return True
    return text == _ACCEPT_EXHAUSTED_TEXTS[1] and event.get("acceptError") in ("EMFILE", "ENFILE")


def accept_exhaustion_line(event: Any) -> bool:
    """Whether a log event is one of the lines Twisted's accept loop writes at the descriptor limit
    (up to three per refused client), which L{accept_exhausted} counts or which follow one."""
    text = event.get("log_format")
    return accept_exhausted(event) or (isinstance(text, str) and text.startswith(_ACCEPT_RECOVERY_TEXTS))
