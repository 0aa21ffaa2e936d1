"""Destination checks: policy, resolution, SSRF guard, dialling the checked address."""
from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.error import ConnectError, ConnectionRefusedError, TCPTimedOutError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from navtwist.egress.dial import Egress
from navtwist.outcome import Refusal
from navtwist.egress.policy import Policy

from navtwist.testing import FakeResolver


ALLOW = ["api.github.com:443", "*.pythonhosted.org:443", "pypi.org:*", "127.0.0.1:8080",
         "localhost:8080", "app.localhost:*", "loop.example:*", "self.example:*", "[::ffff:127.0.0.1]:9000", "rebind.example:443", "internal.example:8080", "slow.example:443", "gone.example:443"]
TABLE = {
    "api.github.com": ["140.82.112.6"],
    "files.pythonhosted.org": ["151.101.0.223", "2a04:4e42::223"],
    "pypi.org": ["151.101.64.223"],
    "localhost": ["127.0.0.1", "::1"],
    "rebind.example": ["93.184.216.34", "169.254.169.254"],
    "internal.example": ["10.1.2.3"],
    "slow.example": None,
    "gone.example": [],
    "app.localhost": ["93.184.216.34"],  # a DNS server may say so: never asked
    "loop.example": ["198.51.100.7"],  # this host's public address
    "self.example": ["2001:db8::7"],
}
OWN = frozenset({ipaddress.ip_address("198.51.100.7"), ipaddress.ip_address("2001:db8::7")})


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver(TABLE)


@pytest.fixture
def egress(clock: MemoryReactorClock, resolver: FakeResolver) -> Egress:
    return Egress(clock, clock, resolver, Policy.parse(ALLOW), connect_timeout=5, own_addresses=lambda: OWN)


def _result(d):  # type: ignore[no-untyped-def]
    box: list = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


def _refusal(d) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    result = _result(d)
    assert isinstance(result, Failure) and result.check(Refusal), result
    return result.value.status, result.value.code, result.value.message


@pytest.mark.parametrize("host, port, address", [
    ("api.github.com", 443, "140.82.112.6"),
    ("API.GitHub.com.", 443, "140.82.112.6"),
    ("files.pythonhosted.org", 443, "151.101.0.223"),
    ("pypi.org", 8443, "151.101.64.223"),
    ("127.0.0.1", 8080, "127.0.0.1"),
])
def test_allowed_destinations_resolve_to_the_address_to_dial(egress: Egress, host: str, port: int, address: str) -> None:
    assert str(_result(egress.destination(host, port, "CONNECT x"))) == address


@pytest.mark.parametrize("host, port", [
    ("api.github.com", 80), ("github.com", 443), ("pythonhosted.org", 443), ("127.0.0.1", 8081),
    ("10.0.0.1", 443), ("169.254.169.254", 80), ("::1", 8080),
])
def test_not_allowed_is_policy_denied_without_resolving(egress: Egress, resolver: FakeResolver, host: str, port: int) -> None:
    assert _refusal(egress.destination(host, port, f"CONNECT {host}:{port}")) == (
        403, "policy_denied", f"CONNECT {host}:{port} not permitted by policy")
    assert resolver.asked == []


@pytest.mark.parametrize("host, port, reason", [
    ("localhost", 8080, "loopback"),
    ("rebind.example", 443, "link-local"),  # one internal answer poisons the set
    ("internal.example", 8080, "private"),
])
def test_names_resolving_inside_are_ssrf_denied(egress: Egress, host: str, port: int, reason: str) -> None:
    status, error, detail = _refusal(egress.destination(host, port, "x"))
    assert (status, error) == (403, "ssrf_denied") and reason in detail


def test_unresolvable_name_is_502(egress: Egress) -> None:
    assert _refusal(egress.destination("gone.example", 443, "x"))[:2] == (502, "upstream_unreachable")


def test_resolution_that_never_answers_times_out_with_504(egress: Egress, clock: MemoryReactorClock) -> None:
    d = egress.destination("slow.example", 443, "x")
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    assert _refusal(d)[:2] == (504, "upstream_timeout")


def test_invalid_host_is_400(egress: Egress) -> None:
    assert _refusal(egress.destination("a..b", 443, "x"))[:2] == (400, "bad_request")


def test_connect_dials_exactly_the_checked_address(egress: Egress, clock: MemoryReactorClock) -> None:
    address = _result(egress.destination("files.pythonhosted.org", 443, "x"))
    egress.connect(address, 443, Factory.forProtocol(Protocol))
    host, port, _factory, timeout, _bind = clock.tcpClients[0]
    assert (host, port, timeout) == ("151.101.0.223", 443, 5)


@pytest.mark.parametrize("error, expected", [
    (ConnectionRefusedError(), (502, "upstream_unreachable")),
    (ConnectError(), (502, "upstream_unreachable")),
    (TCPTimedOutError(), (504, "upstream_timeout")),
    (TimeoutError(), (504, "upstream_timeout")),
])
def test_dial_failures_are_mapped(egress: Egress, clock: MemoryReactorClock, error: Exception, expected: tuple) -> None:
    d = egress.connect(_result(egress.destination("api.github.com", 443, "x")), 443, Factory.forProtocol(Protocol))
    connector = clock.connectors[0]
    clock.tcpClients[0][2].clientConnectionFailed(connector, Failure(error))
    assert _refusal(d)[:2] == expected


@pytest.mark.parametrize("host, port", [("loop.example", 3128), ("loop.example", 22), ("self.example", 9090)])
def test_a_name_resolving_to_this_hosts_address_is_ssrf_denied_on_every_port(egress: Egress, host: str,
                                                                               port: int) -> None:
    assert _refusal(egress.destination(host, port, "x")) == (403, "ssrf_denied",
                                                              f"{host} resolves to a this-host address")


def test_this_hosts_addresses_are_read_at_each_check(clock: MemoryReactorClock, resolver: FakeResolver) -> None:
    own: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    egress = Egress(clock, clock, resolver, Policy.parse(ALLOW), connect_timeout=5,
                    own_addresses=lambda: frozenset(own))
    assert str(_result(egress.destination("loop.example", 443, "x"))) == "198.51.100.7"
    own.add(ipaddress.ip_address("198.51.100.7"))  # an address added while running
    assert _refusal(egress.destination("loop.example", 443, "x"))[1] == "ssrf_denied"


def test_a_localhost_subdomain_is_refused_without_resolving(egress: Egress, resolver: FakeResolver) -> None:
    assert _refusal(egress.destination("app.localhost", 443, "x")) == (403, "ssrf_denied",
                                                                       "app.localhost is a loopback name")
    assert resolver.asked == []


def test_an_ipv4_literal_entry_exempts_its_mapped_form(clock: MemoryReactorClock) -> None:
    resolver = FakeResolver({"mapped.example": ["::ffff:127.0.0.1"], "plain.example": ["127.0.0.1"]})
    egress = Egress(clock, clock, resolver, Policy.parse(["mapped.example:8080", "plain.example:9000",
                                                          "127.0.0.1:8080", "[::ffff:127.0.0.1]:9000"]),
                    connect_timeout=5, own_addresses=frozenset)
    assert str(_result(egress.destination("mapped.example", 8080, "x"))) == "::ffff:7f00:1"
    assert str(_result(egress.destination("plain.example", 9000, "x"))) == "127.0.0.1"
