"""The listener's decision for CONNECTs to intercepted hosts, and its explicit mode."""
from __future__ import annotations

import json
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from navtwist.ca import CAError
from navtwist.config import Limits, Timeouts
from navtwist.decisions import DecisionRecord
from navtwist.egress.dial import Egress
from navtwist.egress.policy import Policy
from navtwist.intercept.rules import parse_intercept
from navtwist.listener import Mode, ProxyFactory

from navtwist.testing import FakeResolver, RecordingTransport


class FakeCA:
    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.asked: list[str] = []

    def server_options(self, hostname: str) -> str:
        self.asked.append(hostname)
        if self.broken:
            raise CAError("CA certificate expired")
        return f"tls-options-for-{hostname}"


class Site:
    """Records the channels it builds and what they receive."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.channels: list[Channel] = []

    def buildProtocol(self, addr: object) -> Channel:
        channel = Channel()
        self.channels.append(channel)
        return channel


class Channel:
    intercepted: tuple[str, int] | None = None

    def makeConnection(self, transport: object) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


class Decisions:
    def __init__(self) -> None:
        self.records: list[DecisionRecord] = []

    def record(self, record: DecisionRecord, now: float) -> None:
        self.records.append(record)


INTERCEPT = parse_intercept([
    {"host": "api.github.com", "access": "read-only"},
    {"host": "api.openai.com", "inference": True},
])


def _factory(ca: FakeCA | None = None, policy: Policy | None = None) -> tuple[ProxyFactory, dict[str, Any]]:
    clock = MemoryReactorClock()
    sites = {"inference": Site("inference"), "forward": Site("forward"), "intercept": Site("intercept")}
    policy = policy or Policy(Policy.parse(["pypi.org:443"]).rules, INTERCEPT)
    egress = Egress(clock, clock, FakeResolver({"pypi.org": ["151.101.0.223"]}), policy, connect_timeout=4)
    decisions = Decisions()
    factory = ProxyFactory(
        ca or FakeCA(), sites["inference"], sites["forward"], egress, Limits(), Timeouts(), clock,
        intercept_site=sites["intercept"], decisions=decisions,  # type: ignore[arg-type]
    )
    return factory, {**sites, "decisions": decisions, "clock": clock}


def _connect(factory: ProxyFactory, head: bytes) -> tuple[Any, RecordingTransport]:
    protocol = factory.buildProtocol(None)
    transport = RecordingTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(head)
    return protocol, transport


def test_connect_to_an_intercept_entry_is_terminated_with_a_leaf_for_that_host() -> None:
    factory, parts = _factory()
    protocol, transport = _connect(factory, b"CONNECT api.github.com:443 HTTP/1.1\r\nHost: api.github.com:443\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    assert transport.tls == "tls-options-for-api.github.com"
    [channel] = parts["intercept"].channels
    assert channel.intercepted == ("api.github.com", 443)
    assert protocol.mode is Mode.HTTP
    assert parts["inference"].channels == [] and factory.egress.policy.allows("api.github.com", 443) is False


def test_inference_entry_is_served_by_the_inference_site() -> None:
    factory, parts = _factory()
    _connect(factory, b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
    [channel] = parts["inference"].channels
    assert channel.intercepted == ("api.openai.com", 443)
    assert parts["intercept"].channels == []


def test_a_ca_that_cannot_issue_refuses_before_answering_200() -> None:
    factory, parts = _factory(ca=FakeCA(broken=True))
    protocol, transport = _connect(factory, b"CONNECT api.github.com:443 HTTP/1.1\r\nHost: api.github.com:443\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and b"200 Connection Established" not in transport.value()
    assert json.loads(body)["error"] == "intercept_unavailable"
    assert transport.tls is None and parts["intercept"].channels == []
    assert protocol.mode is Mode.CLOSING and transport.disconnecting


def test_inference_local_is_checked_before_the_ca_answers_too() -> None:
    factory, _ = _factory(ca=FakeCA(broken=True))
    _, transport = _connect(factory, b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 502 ")


def test_unlisted_host_is_denied_and_logged_as_a_tunnel_decision() -> None:
    factory, parts = _factory()
    protocol, transport = _connect(factory, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 403 ")
    [record] = parts["decisions"].records
    assert (record.kind, record.host, record.port, record.decision, record.reason, record.status) == (
        "tunnel", "evil.example", 443, "deny", "policy_denied", 403)
    assert record.entry is None  # no entry decided: the default deny
    assert protocol.mode is Mode.CLOSING


def test_allowed_host_is_dialled_not_intercepted() -> None:
    factory, parts = _factory()
    protocol, transport = _connect(factory, b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n")
    assert protocol.mode is Mode.DIALING and transport.value() == b""
    assert parts["clock"].tcpClients[0][:2] == ("151.101.0.223", 443)
    assert parts["intercept"].channels == []


def test_mode_only_moves_forward() -> None:
    factory, _ = _factory()
    protocol, _ = _connect(factory, b"CONNECT api.github.com:443 HTTP/1.1\r\nHost: api.github.com:443\r\n\r\n")
    try:
        protocol._enter(Mode.HEAD)
    except AssertionError as e:
        assert "HTTP to HEAD" in str(e)
    else:
        raise AssertionError("a connection went back to reading its first head")
