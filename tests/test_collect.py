"""Cycles left by closed connections are collected in step with the closes (navtwist/service/collect.py)."""
from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from navtwist.config import Limits, Timeouts
from navtwist.egress.dial import Egress
from navtwist.egress.policy import Policy
from navtwist.listener import ProxyFactory
from navtwist.service.collect import ClosedCollector
from navtwist.testing import FakeResolver, RecordingTransport


class Collections:
    def __init__(self) -> None:
        self.generations: list[int] = []

    def __call__(self, generation: int) -> int:
        self.generations.append(generation)
        return 0


def _collector(open_connections: list[int], minimum: int = 10, ratio: int = 2
               ) -> tuple[ClosedCollector, MemoryReactorClock, Collections]:
    clock, collect = MemoryReactorClock(), Collections()
    return ClosedCollector(clock, lambda: open_connections[0], minimum, ratio, collect), clock, collect


def test_a_full_collection_runs_after_the_minimum_of_closes_from_the_reactor() -> None:
    collector, clock, collect = _collector([0])
    for _ in range(9):
        collector.closed()
    clock.advance(0)
    assert collect.generations == []
    collector.closed()
    assert collect.generations == []  # not inside the connectionLost that closed it
    clock.advance(0)
    assert collect.generations == [2]


def test_with_many_connections_open_it_waits_for_ratio_times_as_many_closes() -> None:
    collector, clock, collect = _collector([50])
    for _ in range(99):
        collector.closed()
    clock.advance(0)
    assert collect.generations == []
    collector.closed()
    clock.advance(0)
    assert collect.generations == [2]


def test_the_count_starts_again_after_each_collection_and_one_is_scheduled_at_a_time() -> None:
    collector, clock, collect = _collector([0])
    for _ in range(25):
        collector.closed()
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert collect.generations == [2]
    for _ in range(9):
        collector.closed()
    clock.advance(0)
    assert collect.generations == [2]
    collector.closed()
    clock.advance(0)
    assert collect.generations == [2, 2]


def _factory(closed: list[int]) -> ProxyFactory:
    clock = MemoryReactorClock()
    egress = Egress(clock, clock, FakeResolver({}), Policy(Policy.parse([]).rules), connect_timeout=4)
    return ProxyFactory(
        None, None, None, egress, Limits(max_connections=1), Timeouts(), clock,  # type: ignore[arg-type]
        intercept_site=None, closed=lambda: closed.append(1),  # type: ignore[arg-type]
    )


def test_the_listener_reports_each_counted_connection_that_closes() -> None:
    closed: list[int] = []
    factory = _factory(closed)
    first, refused = factory.buildProtocol(None), factory.buildProtocol(None)
    first.makeConnection(RecordingTransport())
    refused.makeConnection(RecordingTransport())  # over max_connections: refused, never counted
    refused.connectionLost(Failure(ConnectionError("gone")))
    assert closed == []
    first.connectionLost(Failure(ConnectionError("gone")))
    first.connectionLost(Failure(ConnectionError("gone")))
    assert closed == [1]


def test_the_service_collects_after_its_proxy_connections_close(tmp_path: Path) -> None:
    from navtwist.service.server_tap import Options, make_service

    options = Options()
    options.parseOptions(["--listen", "tcp:3999:interface=127.0.0.1", "--ca-dir", str(tmp_path / "ca")])
    reactor = MemoryReactorClock()
    make_service(options["navtwist-config"], reactor).startService()
    [(_port, factory, _backlog, _interface)] = reactor.tcpServers
    assert isinstance(factory, ProxyFactory) and factory.closed is not None
    for _ in range(500):
        factory.closed()
    assert [call.func.__name__ for call in reactor.getDelayedCalls()] == ["_run"]
