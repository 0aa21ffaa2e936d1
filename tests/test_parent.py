"""The parent proxy (C{upstream_proxy}): CONNECT to the checked address, its answer, then the caller's protocol."""
from __future__ import annotations

import base64

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import URI
from zope.interface import implementer

from navtwist.config import ConfigError, UpstreamProxy, parse_config
from navtwist.egress.dial import Egress
from navtwist.egress.forward import failure_refusal
from navtwist.egress.policy import Policy
from navtwist.intercept.origin import OriginClients
from navtwist.config import Limits
from navtwist.outcome import Refusal
from navtwist.testing import FakeResolver
from navtwist.upstream.endpoints import UpstreamEndpoints, upstream_endpoint
from navtwist.upstream.parent import MAX_ANSWER_HEAD, ParentProxyError, ParentProxyRefused, parent_refusal

# Nothing here leaves the process: the reactor is a MemoryReactorClock.
PARENT = UpstreamProxy("192.0.2.1", 3128)
AUTH = b"Basic " + base64.b64encode(b"user:pass")


class Recorder(Protocol):
    """The caller's protocol: what reached it, and how it was connected."""

    def __init__(self) -> None:
        self.received = b""
        self.made = 0
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    read_closed = False

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass


def _result(d: Deferred) -> object:
    box: list = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


def _dial(reactor: MemoryReactorClock, host: str = "198.51.100.7", port: int = 443,
          parent: UpstreamProxy = PARENT, protocol: type[Protocol] = Recorder) -> tuple[Deferred, StringTransport]:
    """Connect through C{parent} and accept the TCP connection to it; returns (result, transport to the parent)."""
    d = upstream_endpoint(reactor, host, port, 5, parent).connect(Factory.forProtocol(protocol))
    parent_host, parent_port, factory, timeout, _ = reactor.tcpClients[-1]
    assert (parent_host, parent_port, timeout) == (parent.host, parent.port, 5)
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    return d, transport


def test_connect_names_the_target_then_hands_over_with_leftover_bytes() -> None:
    reactor = MemoryReactorClock()
    d, transport = _dial(reactor)
    assert transport.value() == b"CONNECT 198.51.100.7:443 HTTP/1.1\r\nHost: 198.51.100.7:443\r\n\r\n"
    transport.clear()
    # The answer may arrive in pieces; bytes after its head belong to the destination.
    protocol_side = _handshake()
    protocol_side.dataReceived(b"HTTP/1.1 200 Connection est")
    assert not d.called
    protocol_side.dataReceived(b"ablished\r\nVia: parent\r\n\r\nSSH-2.0-banner\r\n")
    inner = _result(d)
    assert isinstance(inner, Recorder)
    assert inner.made == 1 and inner.transport is transport
    assert inner.received == b"SSH-2.0-banner\r\n"
    protocol_side.dataReceived(b"more")
    assert inner.received.endswith(b"more")
    inner.transport.write(b"to destination")
    assert transport.value() == b"to destination"
    assert not reactor.getDelayedCalls(), "the deadline is cancelled once connected"


def _handshake() -> Protocol:
    """The last handshake protocol built (behind the endpoint's wrapper), to feed it the parent's bytes."""
    return _built[-1]


_built: list[Protocol] = []


@pytest.fixture(autouse=True)
def _track_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remember the handshake protocols built, so tests can feed them the parent's bytes."""
    from navtwist.upstream import parent

    original = parent.PreparedFactory.buildProtocol

    def build(self, addr):  # type: ignore[no-untyped-def]
        protocol = original(self, addr)
        _built.append(protocol)
        return protocol

    monkeypatch.setattr(parent.PreparedFactory, "buildProtocol", build)
    _built.clear()


@pytest.mark.parametrize("host, authority", [("2001:db8::7", b"[2001:db8::7]:443"), ("api.example.test", b"api.example.test:443")])
def test_ipv6_targets_are_bracketed_and_credentials_sent(host: str, authority: bytes) -> None:
    reactor = MemoryReactorClock()
    _, transport = _dial(reactor, host=host, parent=UpstreamProxy("192.0.2.1", 3128, authorization=AUTH))
    assert transport.value() == (b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority
                                 + b"\r\nProxy-Authorization: " + AUTH + b"\r\n\r\n")


@pytest.mark.parametrize("status", [101, 301, 403, 407, 502])
def test_refusal_fails_with_the_status_and_drops_the_connection(status: int) -> None:
    reactor = MemoryReactorClock()
    d, transport = _dial(reactor)
    _handshake().dataReceived(b"HTTP/1.1 %d Nope\r\nContent-Length: 0\r\n\r\n" % status)
    failure = _result(d)
    assert isinstance(failure, Failure) and failure.check(ParentProxyRefused)
    assert str(failure.value) == f"parent proxy refused CONNECT: {status}"
    assert parent_refusal(failure) == Refusal(502, "upstream_unreachable", f"parent proxy refused CONNECT: {status}")
    assert transport.disconnecting


@pytest.mark.parametrize("answer, message", [
    (b"SSH-2.0-not-http\r\n\r\n", "parent proxy sent an invalid answer to CONNECT"),
    (b"HTTP/1.1 200 " + b"x" * (MAX_ANSWER_HEAD + 1), "parent proxy's answer to CONNECT is too large"),
])
def test_bad_answers_fail(answer: bytes, message: str) -> None:
    reactor = MemoryReactorClock()
    d, transport = _dial(reactor)
    _handshake().dataReceived(answer)
    failure = _result(d)
    assert isinstance(failure, Failure) and failure.check(ParentProxyError) and str(failure.value) == message
    assert transport.disconnecting


def test_parent_closing_before_answering_fails() -> None:
    reactor = MemoryReactorClock()
    d, _ = _dial(reactor)
    _handshake().connectionLost(Failure(Exception("closed")))
    failure = _result(d)
    assert isinstance(failure, Failure) and str(failure.value) == (
        "parent proxy closed the connection before answering CONNECT")


def test_a_parent_that_never_answers_times_out() -> None:
    reactor = MemoryReactorClock()
    d, transport = _dial(reactor)
    reactor.advance(4.9)
    assert not d.called
    reactor.advance(0.1)
    failure = _result(d)
    assert isinstance(failure, Failure) and failure.check(TimeoutError)
    assert transport.disconnecting
    # A late answer changes nothing.
    _handshake().dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")


def test_connecting_to_the_parent_times_out_within_the_same_deadline() -> None:
    reactor = MemoryReactorClock()
    d = upstream_endpoint(reactor, "198.51.100.7", 443, 5, PARENT).connect(Factory.forProtocol(Recorder))
    reactor.advance(5)
    failure = _result(d)
    assert isinstance(failure, Failure) and failure.check(TimeoutError)
    assert reactor.connectors[-1].stoppedConnecting


def test_an_unreachable_parent_is_named() -> None:
    from twisted.internet.error import ConnectionRefusedError

    reactor = MemoryReactorClock()
    d = upstream_endpoint(reactor, "198.51.100.7", 443, 5, PARENT).connect(Factory.forProtocol(Recorder))
    _, _, factory, _, _ = reactor.tcpClients[-1]
    factory.clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))
    failure = _result(d)
    assert isinstance(failure, Failure) and str(failure.value) == "cannot connect to the parent proxy"
    assert not reactor.getDelayedCalls()


def test_cancel_drops_the_connection() -> None:
    reactor = MemoryReactorClock()
    d, transport = _dial(reactor)
    d.cancel()
    failure = _result(d)
    assert isinstance(failure, Failure) and failure.check(CancelledError)
    assert transport.disconnecting and not reactor.getDelayedCalls()


def test_half_close_reaches_a_half_closeable_protocol() -> None:
    reactor = MemoryReactorClock()
    d, _ = _dial(reactor, protocol=HalfCloser)
    handshake = _handshake()
    handshake.dataReceived(b"HTTP/1.0 200 OK\r\n\r\n")
    inner = _result(d)
    assert isinstance(inner, HalfCloser)
    handshake.readConnectionLost()  # type: ignore[attr-defined]
    assert inner.read_closed
    handshake.connectionLost(Failure(Exception("gone")))
    assert inner.lost is not None


def test_half_close_closes_for_other_protocols() -> None:
    reactor = MemoryReactorClock()
    d, transport = _dial(reactor)
    handshake = _handshake()
    handshake.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    handshake.readConnectionLost()  # type: ignore[attr-defined]
    assert transport.disconnecting


# --- every path uses it -------------------------------------------------------------------------


def test_tunnels_connect_to_the_checked_address_and_refusals_are_502() -> None:
    reactor = MemoryReactorClock()
    egress = Egress(reactor, reactor, FakeResolver({"api.example.test": ["198.51.100.7"]}),
                    Policy.parse(["api.example.test:443"]), 5, PARENT)
    address = _result(egress.destination("api.example.test", 443, "CONNECT api.example.test:443"))
    d = egress.connect(address, 443, Factory.forProtocol(Recorder))  # type: ignore[arg-type]
    _, _, factory, _, _ = reactor.tcpClients[-1]
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    assert transport.value().startswith(b"CONNECT 198.51.100.7:443 HTTP/1.1\r\n")
    _handshake().dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")
    failure = _result(d)
    assert isinstance(failure, Failure) and failure.value == Refusal(
        502, "upstream_unreachable", "parent proxy refused CONNECT: 403")


def test_forwarded_and_intercepted_failures_say_the_parent_refused() -> None:
    failure = Failure(ParentProxyRefused(407))
    assert failure_refusal(failure, False) == Refusal(502, "upstream_unreachable", "parent proxy refused CONNECT: 407")


@pytest.mark.parametrize("url, target", [
    (b"http://198.51.100.7:8080/x", b"CONNECT 198.51.100.7:8080 "),
    (b"https://api.example.test/v1", b"CONNECT api.example.test:443 "),  # a route's configured name
])
def test_agent_endpoints_connect_through_the_parent(url: bytes, target: bytes) -> None:
    reactor = MemoryReactorClock()
    endpoint = UpstreamEndpoints(reactor, 5, parent=PARENT).endpointForURI(URI.fromBytes(url))
    endpoint.connect(Factory.forProtocol(Recorder))
    host, port, factory, _, _ = reactor.tcpClients[-1]
    assert (host, port) == ("192.0.2.1", 3128)
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    assert transport.value().startswith(target)


def test_intercepted_origins_connect_to_the_checked_address_not_the_name() -> None:
    import ipaddress

    reactor = MemoryReactorClock()
    origins = OriginClients(reactor, 5, Limits(), parent=PARENT)
    agent = origins.agent_for("api.example.test", 443, ipaddress.ip_address("198.51.100.7"), ())
    agent.request(b"GET", b"https://api.example.test/")
    host, port, factory, _, _ = reactor.tcpClients[-1]
    assert (host, port) == ("192.0.2.1", 3128)
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    assert transport.value().startswith(b"CONNECT 198.51.100.7:443 HTTP/1.1\r\n")


def test_an_https_parent_gets_tls_before_connect() -> None:
    reactor = MemoryReactorClock()
    d = upstream_endpoint(reactor, "198.51.100.7", 443, 5, UpstreamProxy("192.0.2.1", 3129, tls=True)).connect(
        Factory.forProtocol(Recorder))
    host, port, factory, _, _ = reactor.tcpClients[-1]
    assert (host, port) == ("192.0.2.1", 3129)
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    assert transport.value().startswith(b"\x16\x03"), "a TLS ClientHello, CONNECT only inside it"
    assert not d.called


def test_without_a_parent_connections_are_direct() -> None:
    reactor = MemoryReactorClock()
    upstream_endpoint(reactor, "198.51.100.7", 443, 5).connect(Factory.forProtocol(Recorder))
    assert reactor.tcpClients[-1][:2] == ("198.51.100.7", 443)


# --- config ----------------------------------------------------------------------------------------

ROUTES = {"routes": [{"name": "r", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}]}


@pytest.mark.parametrize("value, expected", [
    ("http://proxy.corp.example:3128", UpstreamProxy("proxy.corp.example", 3128)),
    ("https://proxy.corp.example:3129/", UpstreamProxy("proxy.corp.example", 3129, tls=True)),
    ({"url": "http://[2001:db8::1]:8080"}, UpstreamProxy("2001:db8::1", 8080)),
    ({"url": "http://10.0.0.1:3128", "auth_env": "PARENT_AUTH"}, UpstreamProxy("10.0.0.1", 3128, authorization=AUTH)),
])
def test_upstream_proxy_config(value: object, expected: UpstreamProxy) -> None:
    config = parse_config({**ROUTES, "upstream_proxy": value}, {"PARENT_AUTH": "user:pass"})
    assert config.upstream_proxy == expected


def test_credentials_from_a_file_never_appear_in_repr_or_str(tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "parent-auth"
    secret.write_text("user:pass\n")
    config = parse_config({**ROUTES, "upstream_proxy": {"url": "http://10.0.0.1:3128", "auth_file": str(secret)}}, {})
    parent = config.upstream_proxy
    assert parent is not None and parent.authorization == AUTH
    assert "dXNlcjpwYXNz" not in repr(config) and "pass" not in repr(parent) + str(parent)
    assert str(parent) == "http://10.0.0.1:3128"


@pytest.mark.parametrize("value, message", [
    ("socks5://p:1080", "upstream_proxy: must be http://host:port or https://host:port"),
    ("http://proxy.corp.example", "upstream_proxy: must be http://host:port or https://host:port"),
    ("http://p:3128/path", "upstream_proxy: must be http://host:port or https://host:port"),
    ("http://user:hunter2@p:3128", "upstream_proxy: credentials in the URL are not accepted; use "
                                   "upstream_proxy.auth_env or auth_file"),
    ({"auth_env": "PARENT_AUTH"}, "upstream_proxy.url: required key is missing"),
    ({"url": "http://p:3128", "user": "x"}, "upstream_proxy.user: unknown key (allowed: url, auth_env, auth_file)"),
    ({"url": "http://p:3128", "auth_env": "UNSET"},
     "upstream_proxy.auth_env: environment variable 'UNSET' is not set or is empty"),
    ({"url": "http://p:3128", "auth_env": "NO_COLON"},
     "upstream_proxy.auth_env: expected user:password without whitespace or control characters"),
    ({"url": "http://p:3128", "auth_env": "PARENT_AUTH", "auth_file": "/x"},
     "upstream_proxy: both auth_env and auth_file are set; use one"),
    ({"url": "http://p:3128", "auth_file": "/nonexistent/auth"},
     "upstream_proxy.auth_file: cannot read /nonexistent/auth: No such file or directory"),
    (3128, "upstream_proxy: expected a mapping, got an integer"),
])
def test_upstream_proxy_errors_name_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**ROUTES, "upstream_proxy": value}, {"PARENT_AUTH": "user:pass", "NO_COLON": "token"})
    assert str(info.value) == message
    assert "hunter2" not in str(info.value) and "token" not in str(info.value)
