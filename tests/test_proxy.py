"""The proxy listener's first-head handling, driven over StringTransport."""
from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from navtwist.config import Limits, Timeouts
from navtwist.egress.dial import Egress
from navtwist.egress.policy import Policy
from navtwist.http.head import BadHead, parse_authority, parse_head
from navtwist.listener import ProxyFactory


from navtwist.testing import FakeResolver, RecordingTransport


class FakeCA:
    def server_options(self, hostname: str) -> str:
        return f"tls-options-for-{hostname}"


class RecordingSite:
    """Stands in for the intercept site: records what its channel receives."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def buildProtocol(self, addr: object) -> "RecordingSite":
        return self

    def makeConnection(self, transport: object) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True


def _connect(factory: ProxyFactory) -> tuple[object, RecordingTransport]:
    protocol = factory.buildProtocol(None)
    transport = RecordingTransport()
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def site() -> RecordingSite:
    return RecordingSite()


@pytest.fixture
def forward_site() -> RecordingSite:
    return RecordingSite()


@pytest.fixture
def factory(clock: MemoryReactorClock, site: RecordingSite, forward_site: RecordingSite) -> ProxyFactory:
    egress = Egress(clock, clock, FakeResolver({"allowed.example": ["93.184.216.34"]}),
                    Policy.parse(["allowed.example:443"]), connect_timeout=4)
    return ProxyFactory(FakeCA(), site, forward_site, egress, Limits(max_head_bytes=512, max_connections=2),
                        Timeouts(head_read=5, tls_handshake=3), clock, intercept_site=site)


def _refusal(transport: StringTransport) -> tuple[int, dict]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert transport.disconnecting
    return int(head.split(b" ")[1]), json.loads(body)


def test_connect_inference_local_is_intercepted(factory: ProxyFactory, site: RecordingSite) -> None:
    protocol, transport = _connect(factory)
    protocol.dataReceived(b"CONNECT Inference.Local:443 HTTP/1.1\r\nHost: inference.local:443\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    assert transport.tls == "tls-options-for-inference.local"
    protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    assert site.received == b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
    protocol.connectionLost(Failure(ConnectionDone()))
    assert site.lost and factory.active == 0


def test_tls_handshake_must_finish_in_time(factory: ProxyFactory, clock: MemoryReactorClock) -> None:
    protocol, transport = _connect(factory)
    protocol.dataReceived(b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n\r\n")
    clock.advance(2.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.aborted  # a peer stalling the handshake would ignore a polite close


def test_completed_handshake_cancels_its_timer(factory: ProxyFactory, clock: MemoryReactorClock) -> None:
    protocol, transport = _connect(factory)
    protocol.dataReceived(b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n\r\n")
    protocol.handshakeCompleted()
    clock.advance(100)
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "head, status, error, detail",
    [
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 403, "policy_denied", "CONNECT example.com:443 not permitted by policy"),
        (b"CONNECT inference.local:80 HTTP/1.1\r\nHost: inference.local:80\r\n\r\n", 403, "policy_denied", "CONNECT inference.local:80 not permitted by policy"),
        (b"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", 400, "bad_request", "use CONNECT for https:// URLs"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", None),
        (b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", 400, "bad_request", "CONNECT target must be host:port"),
        (b"CONNECT example.com:99999 HTTP/1.1\r\nHost: example.com:99999\r\n\r\n", 400, "bad_request", None),
        (b"CONNECT exa mple.com:443 HTTP/1.1\r\n\r\n", 400, "bad_request", None),
        (b"CONNECT a_b.com:443 HTTP/2.0\r\n\r\n", 400, "bad_request", None),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nBad Header: x\r\n\r\n", 400, "bad_request", None),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nX: a\rb\r\n\r\n", 400, "bad_request", None),
    ],
)
def test_refusals_are_json_and_close(factory: ProxyFactory, site: RecordingSite, head: bytes, status: int,
                                     error: str, detail: str | None) -> None:
    protocol, transport = _connect(factory)
    protocol.dataReceived(head)
    got_status, doc = _refusal(transport)
    assert (got_status, doc["error"]) == (status, error)
    if detail is not None:
        assert doc["detail"] == detail
    assert site.received == b""


def test_head_arriving_in_pieces_is_assembled(factory: ProxyFactory) -> None:
    protocol, transport = _connect(factory)
    for byte in b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n\r\n":
        protocol.dataReceived(bytes([byte]))
    assert transport.value().startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("head", [b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\nA: " + b"a" * 600, b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\nA: " + b"a" * 500 + b"\r\n\r\n"])
def test_oversized_head_is_431(factory: ProxyFactory, head: bytes) -> None:
    protocol, transport = _connect(factory)
    protocol.dataReceived(head)
    assert _refusal(transport)[0] == 431


def test_slow_head_times_out_with_408(factory: ProxyFactory, clock: MemoryReactorClock) -> None:
    protocol, transport = _connect(factory)
    protocol.dataReceived(b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n")
    clock.advance(4.9)
    assert transport.value() == b""
    clock.advance(0.2)
    assert _refusal(transport)[0] == 408


def test_dribbled_head_is_408_although_bytes_keep_coming(factory: ProxyFactory, clock: MemoryReactorClock) -> None:
    protocol, transport = _connect(factory)
    for byte in b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\nX-Slow: " + b"a" * 100:
        if transport.disconnecting:
            break
        protocol.dataReceived(bytes([byte]))
        clock.advance(1)
    assert clock.seconds() == 5  # head_read counts from the connection, not from the last byte
    assert _refusal(transport)[0] == 408


def test_connection_cap_refuses_new_connections_only(factory: ProxyFactory) -> None:
    first, t1 = _connect(factory)
    _connect(factory)
    third, t3 = _connect(factory)
    assert _refusal(t3)[0] == 503
    third.connectionLost(Failure(ConnectionDone()))
    assert factory.active == 2 and not t1.disconnecting
    first.connectionLost(Failure(ConnectionDone()))
    _, t4 = _connect(factory)
    assert not t4.disconnecting


def test_parse_head_lowercases_header_names() -> None:
    head = parse_head(b"CONNECT h:1 HTTP/1.1\r\nHost: h:1\r\nProxy-Authorization: x")
    assert head.headers == ((b"host", b"h:1"), (b"proxy-authorization", b"x"))


@pytest.mark.parametrize("target, expected", [(b"Example.COM.:443", ("example.com", 443)), (b"[::1]:8443", ("::1", 8443))])
def test_parse_authority_normalises(target: bytes, expected: tuple[str, int]) -> None:
    assert parse_authority(target) == expected


def test_parse_authority_rejects_non_ascii() -> None:
    with pytest.raises(BadHead):
        parse_authority("exämple.com:443".encode())


def test_absolute_http_request_goes_to_the_forward_channel_whole(factory: ProxyFactory, forward_site: RecordingSite) -> None:
    protocol, transport = _connect(factory)
    protocol.dataReceived(b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\nGET http")
    assert forward_site.received == b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\nGET http"
    protocol.dataReceived(b"://example.com/y")
    assert forward_site.received.endswith(b"GET http://example.com/y")
    assert transport.value() == b""


def test_allowed_connect_dials_then_answers_200_and_splices(factory: ProxyFactory, clock: MemoryReactorClock) -> None:
    protocol, transport = _connect(factory)
    protocol.dataReceived(b"CONNECT allowed.example:443 HTTP/1.1\r\nHost: allowed.example:443\r\n\r\n\x16\x03\x01early")
    assert transport.value() == b""  # nothing promised before the destination answers
    assert transport.producerState == "paused"
    host, port, upstream_factory, timeout, _ = clock.tcpClients[0]
    assert (host, port, timeout) == ("93.184.216.34", 443, 4)
    upstream = upstream_factory.buildProtocol(None)
    upstream_transport = StringTransport()
    upstream.makeConnection(upstream_transport)
    assert transport.value() == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    assert upstream_transport.value() == b"\x16\x03\x01early"
    assert transport.producerState == "producing"
    protocol.dataReceived(b" more")
    upstream.dataReceived(b"answer")
    assert upstream_transport.value().endswith(b" more") and transport.value().endswith(b"answer")


def test_client_leaving_while_dialling_cancels_the_dial(factory: ProxyFactory, clock: MemoryReactorClock) -> None:
    protocol, _ = _connect(factory)
    protocol.dataReceived(b"CONNECT allowed.example:443 HTTP/1.1\r\nHost: allowed.example:443\r\n\r\n")
    protocol.connectionLost(Failure(ConnectionDone()))
    assert clock.connectors[0].stoppedConnecting
    assert factory.active == 0


def test_unreachable_destination_is_502_json(factory: ProxyFactory, clock: MemoryReactorClock) -> None:
    protocol, transport = _connect(factory)
    protocol.dataReceived(b"CONNECT allowed.example:443 HTTP/1.1\r\nHost: allowed.example:443\r\n\r\n")
    clock.tcpClients[0][2].clientConnectionFailed(clock.connectors[0], Failure(ConnectionRefusedError()))
    assert _refusal(transport) == (502, {"error": "upstream_unreachable", "detail": "cannot connect to the destination"})


def test_refused_connect_leaves_nothing_busy(factory: ProxyFactory) -> None:
    protocol, transport = _connect(factory)
    protocol.dataReceived(b"CONNECT denied.example:443 HTTP/1.1\r\nHost: denied.example:443\r\n\r\n")
    assert _refusal(transport)[0] == 403
    assert not protocol.busy()


def test_too_many_header_fields_in_the_first_head_is_431(clock: MemoryReactorClock, site: RecordingSite) -> None:
    egress = Egress(clock, clock, FakeResolver({}), Policy.parse([]), connect_timeout=4)
    factory = ProxyFactory(FakeCA(), site, site, egress, Limits(max_headers=3), Timeouts(), clock, intercept_site=site)
    protocol, transport = _connect(factory)
    protocol.dataReceived(b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n" + b"X-A: 1\r\n" * 4 + b"\r\n")
    assert _refusal(transport) == (431, {"error": "headers_too_large",
                                         "detail": "request head has too many header fields"})
