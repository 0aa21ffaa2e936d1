"""The proxy listener: reads each client's first request head and decides.

- C{CONNECT inference.local:443} is answered by navtwist itself: 200, then TLS
  with a leaf from our CA, then twisted.web's HTTP/1.1 channel serving the
  inference dispatcher on the decrypted bytes.
- C{CONNECT host:port} to a host listed in C{policy.intercept} is answered the
  same way, with a leaf for that host; its requests are checked against the
  entry's rules and sent to the origin (or, for C{inference: true} entries,
  served by the inference dispatcher as inference.local is).
- C{CONNECT host:port} to a destination the policy allows becomes a tunnel.
- An absolute-form C{http://} request hands the connection to the forwarding
  HTTP/1.1 channel (keep-alive), which checks each request's destination.
- Anything else is refused with a JSON reason (deny by default).
"""
from __future__ import annotations

import enum
import typing
from typing import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from navtwist.ca import INFERENCE_HOST, CertificateAuthority
from navtwist.compat import close_beneath_tls
from navtwist.decisions import ALLOW, DENY, DecisionLog, DecisionRecord
from navtwist.config import Limits, Timeouts
from navtwist.egress.dial import Egress
from navtwist.outcome import Refusal
from navtwist.http.channel import HardenedChannel
from navtwist.http.head import BadHead, ProxyHead, parse_authority, parse_head
from navtwist.http.channel import HardenedSite, raw_json_response
from navtwist.egress.tunnel import Splice, TunnelUpstream, TunnelUpstreamFactory
from navtwist.interfaces import IDrainCut, IStreamTransport
from navtwist.upstream.flow import bound_socket_buffers

log = Logger(namespace="navtwist.proxy")


class TunnelMetrics(typing.Protocol):
    """What the listener reports about tunnels (the service's metrics provide it)."""

    def tunnel_decision(self, decision: str) -> None: ...

    def tunnel_bytes(self, up: int, down: int) -> None: ...

class HandshakeFailures:
    """Failed TLS handshakes with clients, logged without flooding.

    The usual cause is a sandbox that does not trust navtwist's CA, and such a
    client fails every connection: the first failure is one warning line
    (the SNI and the reason), later ones within C{interval} seconds are
    counted and reported as one line when it ends.
    """

    def __init__(self, clock: IReactorTime, interval: float = 10.0) -> None:
        self._clock = clock
        self._interval = interval
        self._quiet_until = 0.0
        self._suppressed = 0
        self._last = ("", "")
        self._flush_call: IDelayedCall | None = None

    def report(self, sni: str, reason: str) -> None:
        now = self._clock.seconds()
        if now < self._quiet_until:
            self._suppressed += 1
            self._last = (sni, reason)
            if self._flush_call is None:
                self._flush_call = self._clock.callLater(self._quiet_until - now, self._flush)
            return
        log.warn("TLS handshake with a client failed for {sni}: {reason} (does the client trust navtwist's CA?)",
                 sni=sni, reason=reason)
        self._quiet_until = now + self._interval

    def _flush(self) -> None:
        self._flush_call = None
        count, self._suppressed = self._suppressed, 0
        sni, reason = self._last
        log.warn("TLS handshake with a client failed {count} more times in {interval:g} s, last for {sni}: {reason}",
                 count=count, interval=self._interval, sni=sni, reason=reason)
        self._quiet_until = self._clock.seconds() + self._interval


def handshake_failure_reason(reason: Failure) -> str:
    """Why a client's TLS handshake failed: OpenSSL's reason texts (C{tlsv1 alert unknown ca}
    is a client that does not trust the CA), or how the connection ended."""
    error = reason.value
    entries = error.args[0] if error is not None and type(error).__module__.startswith("OpenSSL") and error.args else None
    texts = [e[2] for e in entries if isinstance(e, tuple) and len(e) == 3 and e[2]] if isinstance(entries, list) else []
    if texts:
        return ", ".join(texts)
    return "the client closed the connection during the handshake"


INFERENCE_PORT = 443


def proxy_error(status: int, error: str, detail: str) -> bytes:
    """A proxy-level refusal: C{{"error": code, "detail": text}} and close."""
    return raw_json_response(status, {"error": error, "detail": detail})


class Mode(enum.Enum):
    """What a client connection is doing; every change goes through L{ProxyProtocol._enter}."""

    HEAD = "head"  # reading the first request head
    DIALING = "dialing"  # a CONNECT being checked and dialled; client reads paused
    TUNNEL = "tunnel"  # bytes spliced to the destination
    HTTP = "http"  # served by an inner HTTP/1.1 channel (intercepted TLS or http:// forwarding)
    CLOSING = "closing"  # refused or finished: whatever else arrives is ignored


# Allowed transitions: a connection only ever moves forward.
_TRANSITIONS = {
    Mode.HEAD: {Mode.DIALING, Mode.HTTP, Mode.CLOSING},
    Mode.DIALING: {Mode.TUNNEL, Mode.CLOSING},
    Mode.TUNNEL: {Mode.CLOSING},
    Mode.HTTP: {Mode.TUNNEL, Mode.CLOSING},  # an intercepted request upgraded (WebSocket)
    Mode.CLOSING: {Mode.CLOSING},
}


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class ProxyProtocol(Protocol):
    """One client connection to the proxy.

    In L{Mode.HEAD} this protocol parses the first head; afterwards it passes
    bytes to the inner HTTP channel (L{Mode.HTTP}) or to the tunnel's splice
    (L{Mode.TUNNEL}).  The inner channel, the splice and the pending dial
    exist only in their mode.
    """

    transport: IStreamTransport

    def __init__(self, factory: ProxyFactory) -> None:
        self._factory = factory
        self._mode = Mode.HEAD
        self._buffer = b""
        self._inner: HardenedChannel | None = None  # in Mode.HTTP
        self._splice: Splice | None = None  # in Mode.DIALING (waiting) and Mode.TUNNEL
        self._dialing: Deferred | None = None  # in Mode.DIALING
        self._head_call: IDelayedCall | None = None
        self._tls_call: IDelayedCall | None = None
        self._tls = False  # our own TLS was started (intercepted)
        self._handshaking: str | None = None  # the CONNECT host while our TLS handshake is under way
        self._counted = False
        self._decision: DecisionRecord | None = None  # a tunnel's, written when it ends
        self._tunnel_started = 0.0

    @property
    def mode(self) -> Mode:
        return self._mode

    def _enter(self, mode: Mode) -> None:
        """The one place the mode changes."""
        if mode not in _TRANSITIONS[self._mode]:
            raise AssertionError(f"listener cannot go from {self._mode.name} to {mode.name}")
        self._mode = mode
        if mode is not Mode.HEAD:
            self._cancel(self._head_call)
            self._head_call = None
        if mode is not Mode.DIALING:
            self._dialing = None

    def connectionMade(self) -> None:
        factory = self._factory
        if factory.draining:
            self._refuse(503, "shutting_down", "proxy is shutting down")
            return
        if factory.active >= factory.limits.max_connections:
            log.warn("connection refused: {active} connections open", active=factory.active)
            self._refuse(503, "too_many_connections", "proxy is at its connection limit")
            return
        factory.active += 1
        factory.protocols.add(self)
        self._counted = True
        bound_socket_buffers(self.transport, factory.limits.socket_buffer_bytes)
        self._head_call = factory.clock.callLater(factory.timeouts.head_read, self._head_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._mode is Mode.HTTP:
            assert self._inner is not None
            self._inner.dataReceived(data)
            return
        if self._mode is Mode.TUNNEL:
            assert self._splice is not None
            self._splice.from_client(data)
            return
        if self._mode is not Mode.HEAD:
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
        try:
            parsed = parse_head(head)
        except BadHead as e:
            self._refuse(400, "bad_request", str(e))
            return
        if len(parsed.headers) > self._factory.limits.max_headers:
            self._refuse(431, "headers_too_large", "request head has too many header fields")
            return
        try:
            self._handle(parsed, head, rest)
        except BadHead as e:
            self._refuse(400, "bad_request", str(e))

    def _handle(self, head: ProxyHead, raw_head: bytes, rest: bytes) -> None:
        if head.method != b"CONNECT":
            target = head.target.lower()
            if target.startswith(b"https://"):
                self._refuse(400, "bad_request", "use CONNECT for https:// URLs")
            elif target.startswith(b"http://"):
                self._forward(raw_head + b"\r\n\r\n" + rest)
            else:
                self._refuse(400, "bad_request", "not a proxy request: expected CONNECT or an absolute http:// URI")
            return
        host, port = parse_authority(head.target)
        factory = self._factory
        if host == INFERENCE_HOST and port == INFERENCE_PORT:
            self._intercept(host, port, factory.site, rest)
            return
        entry = factory.egress.policy.intercept_for(host, port)
        if entry is None:
            self._tunnel(host, port, rest)
        elif entry.inference:
            self._intercept(host, port, factory.site, rest)
        else:
            self._intercept(host, port, factory.intercept_site, rest)

    def _intercept(self, host: str, port: int, site: HardenedSite, rest: bytes) -> None:
        """Answer the CONNECT ourselves and serve HTTP/1.1 inside our own TLS.

        The TLS options are made before the client hears C{200}: a CA that
        cannot issue a leaf (expired, say) is a 502 the client can read, not
        an accepted CONNECT followed by a dropped connection.
        """
        factory = self._factory
        try:
            options = factory.ca.server_options(host)
        except Exception:
            log.failure("cannot issue a certificate for {host}", host=host)
            self._refuse(502, "intercept_unavailable", "the proxy cannot present a certificate for this host")
            return
        self._enter(Mode.HTTP)
        self.transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self.transport.startTLS(options)
        self._tls = True
        self._handshaking = host
        self._tls_call = factory.clock.callLater(factory.timeouts.tls_handshake, self._tls_timed_out)
        inner = site.buildProtocol(self.transport.getPeer())
        # The origin a request inside this TLS is for (the CONNECT's authority, not its Host header).
        inner.intercepted = (host, port)
        inner.upgrade = self.upgrade
        self._inner = inner
        inner.makeConnection(self.transport)
        if rest:
            # Ciphertext that arrived together with the CONNECT head belongs
            # to the TLS layer that now sits in front of this protocol.
            self.transport.protocol.dataReceived(rest)

    def _forward(self, data: bytes) -> None:
        """Serve this connection with the forwarding HTTP/1.1 channel, head included."""
        self._enter(Mode.HTTP)
        inner = self._inner = self._factory.forward_site.buildProtocol(self.transport.getPeer())
        inner.makeConnection(self.transport)
        inner.dataReceived(data)

    def _tunnel(self, host: str, port: int, rest: bytes) -> None:
        """Check, resolve and dial the destination, then splice the two connections."""
        self._enter(Mode.DIALING)
        factory = self._factory
        # Nothing more is read from the client until the tunnel is open: bytes
        # it sends early wait in the kernel, not in our memory.
        self.transport.pauseProducing()
        splice = Splice(self.transport, factory.clock, factory.timeouts.write_stall)
        label = f"CONNECT {host}:{port}"
        # Set before the callbacks: a refusal may fire them at once.
        peer = self.transport.getPeer()
        self._decision = DecisionRecord(
            kind="tunnel", client=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}", host=host, port=port,
            decision=DENY, method="CONNECT",
        )
        self._tunnel_started = factory.clock.seconds()
        self._dialing = dialing = factory.egress.destination(host, port, label)
        dialing.addCallback(factory.egress.connect, port, TunnelUpstreamFactory(splice))
        dialing.addCallbacks(self._tunnel_open, self._tunnel_refused, callbackArgs=(splice, rest), errbackArgs=(label,))

    def _tunnel_open(self, upstream: TunnelUpstream, splice: Splice, rest: bytes) -> None:
        self._enter(Mode.TUNNEL)
        self._count_tunnel("allowed")
        if self._decision is not None:
            self._decision.decision, self._decision.status, self._decision.entry = ALLOW, 200, "policy.allow"
        log.info("tunnel open: {peer} → {upstream}", peer=str(self.transport.getPeer()),
                 upstream=str(upstream.transport.getPeer()))
        self.transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self._splice = splice
        bound_socket_buffers(upstream.transport, self._factory.limits.socket_buffer_bytes)
        splice.start(upstream.transport, rest)
        self.transport.resumeProducing()

    def upgrade(self, upstream: IStreamTransport, answer: bytes, decision: DecisionRecord) -> Splice:
        """Hand this connection from its HTTP channel to a splice with C{upstream}
        (an intercepted request the origin upgraded); C{answer} is the origin's
        101 head and whatever followed it."""
        self._enter(Mode.TUNNEL)
        inner, self._inner = self._inner, None
        # The channel is done with this connection: it stops its timers and
        # gives up the transport's producer slot to the splice.
        self.transport.unregisterProducer()
        if inner is not None:
            inner.connectionLost(Failure(ConnectionDone("upgraded to a tunnel")))
        self._decision, self._tunnel_started = decision, self._factory.clock.seconds()
        splice = self._splice = Splice(self.transport, self._factory.clock, self._factory.timeouts.write_stall)
        bound_socket_buffers(upstream, self._factory.limits.socket_buffer_bytes)
        splice.start(upstream)
        splice.from_upstream(answer)
        return splice

    def _tunnel_refused(self, failure: Failure, label: str) -> None:
        self._splice = None
        if failure.check(CancelledError):
            return  # the client left while we were dialling
        refusal = failure.value if isinstance(failure.value, Refusal) else Refusal(
            502, "upstream_unreachable", "cannot connect to the destination")
        if not failure.check(Refusal):
            log.failure("tunnel setup failed for {label}", failure, label=label)
        log.info("{label} refused: {error}", label=label, error=refusal.code)
        self._count_tunnel(refusal.code if refusal.code in ("policy_denied", "ssrf_denied") else "failed")
        if self._decision is not None:
            self._decision.reason, self._decision.status = refusal.code, refusal.status
            if refusal.code != "policy_denied":
                self._decision.entry = "policy.allow"  # allowed by name; refused on its address or reachability
            self._write_decision()
        self._refuse(refusal.status, refusal.code, refusal.message)

    def _write_decision(self) -> None:
        decision, self._decision = self._decision, None
        if decision is not None and self._factory.decisions is not None:
            now = self._factory.clock.seconds()
            decision.duration_ms = round((now - self._tunnel_started) * 1000, 1)
            self._factory.decisions.record(decision, now)

    def _count_tunnel(self, decision: str) -> None:
        if self._factory.metrics is not None:
            self._factory.metrics.tunnel_decision(decision)

    def readConnectionLost(self) -> None:
        """The client sent FIN: a tunnel passes it on; HTTP modes close."""
        if self._mode is Mode.TUNNEL:
            assert self._splice is not None
            self._splice.client_eof()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def busy(self) -> bool:
        """Whether this connection carries work that a graceful stop should let finish."""
        if self._mode in (Mode.TUNNEL, Mode.DIALING):
            return True
        return self._mode is Mode.HTTP and bool(getattr(self._inner, "requests", None))

    def close_idle(self) -> None:
        """Close this connection, which carries nothing in flight, at once (a graceful stop).

        What its transport still buffers is sent first.  An inner HTTP channel
        stops producing and closes; inside our TLS, close_notify goes out and
        the socket closes after it, without waiting for the client's reply (an
        idle keep-alive client never reads, so it never replies).
        """
        if self._mode is Mode.HTTP and self._inner is not None:
            self._inner.loseConnection()
            if self._tls:
                close_beneath_tls(self.transport)
        else:
            self.transport.loseConnection()

    def close_after_response(self) -> None:
        """While draining: the response in flight is this connection's last
        (it says C{Connection: close} unless its head has gone out already)."""
        inner = self._inner
        if self._mode is Mode.HTTP and inner is not None:
            inner.persistent = False
            for request in getattr(inner, "requests", ()):
                if not request.startedWriting:
                    request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def cut_for_drain(self) -> None:
        """At the drain deadline: end what this connection still carries.

        A response whose exchange can end it cleanly (an event stream is told
        the proxy is shutting down, then gets its chunked end) is left to do
        so, and the connection closes after it like any last response; anything
        else (a tunnel, a call not answered yet) is aborted now.
        """
        requests = list(getattr(self._inner, "requests", ())) if self._mode is Mode.HTTP else []
        if not requests or not all(self._drain_cut(request) for request in requests):
            self.transport.abortConnection()

    @staticmethod
    def _drain_cut(request: object) -> bool:
        """Whether C{request}'s exchange (its L{IDrainCut} component) ends its response itself."""
        cut = request.getComponent(IDrainCut) if isinstance(request, Request) else None
        return cut is not None and bool(cut.drain_cut())

    def handshakeCompleted(self) -> None:
        self._cancel(self._tls_call)
        self._tls_call = None
        self._handshaking = None

    def _handshake_failed(self, reason: str) -> None:
        """Report a client's failed handshake once, naming the SNI it sent (else the CONNECT host)."""
        host, self._handshaking = self._handshaking, None
        if host is None:
            return
        get_handle = getattr(self.transport, "getHandle", None)
        try:
            sni = get_handle().get_servername() if get_handle is not None else None
        except Exception:
            sni = None
        name = sni.decode("ascii", "replace") if isinstance(sni, bytes) else f"{host} (no SNI)"
        self._factory.handshake_failures.report(name, reason)

    def _head_timed_out(self) -> None:
        self._head_call = None
        self._refuse(408, "request_timeout", "request head not received in time")

    def _tls_timed_out(self) -> None:
        self._tls_call = None
        self._handshake_failed("handshake timed out")
        self.transport.abortConnection()

    def _refuse(self, status: int, error: str, detail: str) -> None:
        self._enter(Mode.CLOSING)
        self.transport.write(proxy_error(status, error, detail))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._handshake_failed(handshake_failure_reason(reason))
        self._cancel(self._head_call)
        self._cancel(self._tls_call)
        if self._counted:
            self._factory.active -= 1
            self._factory.protocols.discard(self)
            self._counted = False
            if self._factory.closed is not None:
                self._factory.closed()
        dialing, self._dialing = self._dialing, None
        if dialing is not None:
            dialing.cancel()
        if self._splice is not None:
            self._splice.close()
            if self._factory.metrics is not None:
                self._factory.metrics.tunnel_bytes(self._splice.bytes_up, self._splice.bytes_down)
            if self._decision is not None and self._decision.decision != DENY:
                self._decision.bytes_up, self._decision.bytes_down = self._splice.bytes_up, self._splice.bytes_down
                self._write_decision()
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
        site: HardenedSite,
        forward_site: HardenedSite,
        egress: Egress,
        limits: Limits,
        timeouts: Timeouts,
        clock: IReactorTime,
        metrics: TunnelMetrics | None = None,
        *,
        intercept_site: HardenedSite,
        decisions: DecisionLog | None = None,
        closed: Callable[[], None] | None = None,
    ) -> None:
        self.ca = ca
        self.metrics = metrics
        self.site = site
        self.forward_site = forward_site
        self.intercept_site = intercept_site
        self.decisions = decisions
        self.egress = egress
        self.limits = limits
        self.timeouts = timeouts
        self.clock = clock
        self.active = 0
        self.draining = False
        self.protocols: set[ProxyProtocol] = set()  # open client connections, for draining
        self.handshake_failures = HandshakeFailures(clock)
        self.closed = closed  # called after each counted connection closes (the service's cycle collector)

    def buildProtocol(self, addr: IAddress | None) -> ProxyProtocol:
        return ProxyProtocol(self)
