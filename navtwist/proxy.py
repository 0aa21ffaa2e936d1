"""The proxy listener: reads each client's first request head and decides.

C{CONNECT inference.local:443} is answered by navtwist itself: 200, then TLS
with a leaf from our CA, then twisted.web's HTTP/1.1 channel serving the
inference dispatcher on the decrypted bytes.  Anything else is refused with a
JSON reason (deny by default).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from navtwist.ca import CertificateAuthority
from navtwist.config import Limits, Timeouts
from navtwist.intercept import InterceptSite, raw_json_response

log = Logger(namespace="navtwist.proxy")

INFERENCE_HOST = "inference.local"
INFERENCE_PORT = 443

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")
_HOST = re.compile(r"^[a-z0-9]([a-z0-9\-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]*[a-z0-9])?)*$")


class BadHead(ValueError):
    """The request head cannot be parsed; the message is safe to show the client."""


@dataclass(frozen=True)
class ProxyHead:
    """The parsed first request a client sends to the proxy."""

    method: bytes
    target: bytes
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]


def parse_head(head: bytes) -> ProxyHead:
    """Parse a request head (without its final blank line), strictly.

    @raise BadHead: malformed request line or header line.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1] or not _VERSION.match(parts[2]):
        raise BadHead("malformed request line")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise BadHead("malformed header line")
        value = value.strip(b" \t")
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise BadHead("invalid character in header value")
        headers.append((name.lower(), value))
    return ProxyHead(parts[0], parts[1], parts[2], tuple(headers))


def parse_authority(target: bytes) -> tuple[str, int]:
    """Split a CONNECT target C{host:port} (IPv6 in brackets); the host is normalised.

    @raise BadHead: not a host:port authority.
    """
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise BadHead("CONNECT target is not ASCII") from None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadHead("CONNECT target must be host:port")
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1].lower(), int(port)
    host = host.lower().rstrip(".")
    if not _HOST.match(host):
        raise BadHead("CONNECT target has an invalid host name")
    return host, int(port)


def proxy_error(status: int, error: str, detail: str) -> bytes:
    """A proxy-level refusal: C{{"error": code, "detail": text}} and close."""
    return raw_json_response(status, {"error": error, "detail": detail})


@implementer(IHandshakeListener)
class ProxyProtocol(Protocol):
    """One client connection to the proxy.

    Until the first head is complete this protocol parses it; after an
    interception it only passes decrypted bytes to the inner HTTP channel.
    """

    def __init__(self, factory: ProxyFactory) -> None:
        self._factory = factory
        self._buffer = b""
        self._inner: IProtocol | None = None
        self._head_call: IDelayedCall | None = None
        self._tls_call: IDelayedCall | None = None
        self._counted = False
        self._decided = False

    def connectionMade(self) -> None:
        factory = self._factory
        if factory.active >= factory.limits.max_connections:
            log.warn("connection refused: {active} connections open", active=factory.active)
            self._refuse(503, "too_many_connections", "proxy is at its connection limit")
            return
        factory.active += 1
        self._counted = True
        self._head_call = factory.clock.callLater(factory.timeouts.head_read, self._head_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._decided:
            return
        self._buffer += data
        limit = self._factory.limits.max_head_bytes
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > limit:
                self._refuse(431, "headers_too_large", "request head exceeds the proxy's limit")
            return
        if end + 4 > limit:
            self._refuse(431, "headers_too_large", "request head exceeds the proxy's limit")
            return
        head, rest = self._buffer[:end], self._buffer[end + 4:]
        self._buffer = b""
        self._cancel(self._head_call)
        self._head_call = None
        try:
            self._handle(parse_head(head), rest)
        except BadHead as e:
            self._refuse(400, "bad_request", str(e))

    def _handle(self, head: ProxyHead, rest: bytes) -> None:
        if head.method != b"CONNECT":
            target = head.target.lower()
            if target.startswith(b"https://"):
                self._refuse(400, "bad_request", "use CONNECT for https:// URLs")
            elif target.startswith(b"http://"):
                self._refuse(403, "policy_denied", "plain HTTP forwarding is not permitted by policy")
            else:
                self._refuse(400, "bad_request", "not a proxy request: expected CONNECT or an absolute http:// URI")
            return
        host, port = parse_authority(head.target)
        if host == INFERENCE_HOST and port == INFERENCE_PORT:
            self._intercept(host, rest)
        else:
            log.info("CONNECT {host}:{port} denied by policy", host=host, port=port)
            self._refuse(403, "policy_denied", f"CONNECT {host}:{port} not permitted by policy")

    def _intercept(self, host: str, rest: bytes) -> None:
        """Answer the CONNECT ourselves and serve HTTP/1.1 inside our own TLS."""
        self._decided = True
        factory = self._factory
        self.transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self.transport.startTLS(factory.ca.server_options(host))
        self._tls_call = factory.clock.callLater(factory.timeouts.tls_handshake, self._tls_timed_out)
        self._inner = factory.site.buildProtocol(self.transport.getPeer())
        self._inner.makeConnection(self.transport)
        if rest:
            # Ciphertext that arrived together with the CONNECT head belongs
            # to the TLS layer that now sits in front of this protocol.
            self.transport.protocol.dataReceived(rest)

    def handshakeCompleted(self) -> None:
        self._cancel(self._tls_call)
        self._tls_call = None

    def _head_timed_out(self) -> None:
        self._head_call = None
        self._refuse(408, "request_timeout", "request head not received in time")

    def _tls_timed_out(self) -> None:
        self._tls_call = None
        log.info("TLS handshake timed out")
        self.transport.abortConnection()

    def _refuse(self, status: int, error: str, detail: str) -> None:
        self._decided = True
        self._cancel(self._head_call)
        self._head_call = None
        self.transport.write(proxy_error(status, error, detail))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel(self._head_call)
        self._cancel(self._tls_call)
        if self._counted:
            self._factory.active -= 1
        if self._inner is not None:
            self._inner.connectionLost(reason)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


class ProxyFactory(Factory):
    """Builds a L{ProxyProtocol} per client and holds what they share."""

    noisy = False

    def __init__(
        self,
        ca: CertificateAuthority,
        site: InterceptSite,
        limits: Limits,
        timeouts: Timeouts,
        clock: IReactorTime,
    ) -> None:
        self.ca = ca
        self.site = site
        self.limits = limits
        self.timeouts = timeouts
        self.clock = clock
        self.active = 0

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        return ProxyProtocol(self)
