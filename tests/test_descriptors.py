"""Running out of file descriptors: recognised, counted, logged once per interval; idle pools capped."""
from __future__ import annotations

import errno
import ipaddress
import resource
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectBindError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from navtwist.compat import accept_exhausted, accept_exhaustion_line
from navtwist.egress.dial import Egress
from navtwist.egress.policy import Policy
from navtwist.outcome import Refusal
from navtwist.service.metrics import Metrics
from navtwist.upstream import descriptors
from navtwist.upstream.descriptors import DescriptorWatch, IdleBudget, is_exhaustion, raise_nofile_limit, watched

EMFILE = ConnectBindError(errno.EMFILE, "Too many open files")


def exhaustion_lines(events: list[dict[str, Any]]) -> list[str]:
    return [event["counts"] for event in events if "out of file descriptors" in event.get("log_format", "")]


def test_emfile_and_enfile_are_exhaustion_other_connect_errors_are_not() -> None:
    assert is_exhaustion(Failure(EMFILE))
    assert is_exhaustion(Failure(ConnectBindError(errno.ENFILE, "File table overflow")))
    assert is_exhaustion(OSError(errno.EMFILE, "Too many open files"))
    assert not is_exhaustion(Failure(ConnectBindError(errno.EADDRINUSE, "in use")))
    assert not is_exhaustion(Failure(ConnectionRefusedError()))


def test_a_burst_is_logged_at_once_then_once_per_interval_with_its_count() -> None:
    clock = Clock()
    counted: list[str] = []
    watch = DescriptorWatch(clock, counted.append, interval=10)
    with capturedLogs() as events:
        for _ in range(5):
            watch.record("connect")
        watch.record("accept")
        assert exhaustion_lines(events) == ["1 connect"]
        clock.advance(10)
        assert exhaustion_lines(events) == ["1 connect", "1 accept, 4 connect"]
        clock.advance(10)  # nothing new: no line, and the timer stops
        assert exhaustion_lines(events) == ["1 connect", "1 accept, 4 connect"]
        assert clock.getDelayedCalls() == []
        watch.record("connect")  # a new episode is logged at once again
        assert exhaustion_lines(events) == ["1 connect", "1 accept, 4 connect", "1 connect"]
    assert counted == ["connect"] * 5 + ["accept", "connect"]
    assert watch.total == 7
    [line] = [e for e in events if e.get("counts") == "1 accept, 4 connect"]
    assert line["limit"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    watch.stop()
    assert clock.getDelayedCalls() == []


class _Endpoint:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def connect(self, factory: Any) -> Any:
        return fail(self.error) if self.error is not None else succeed("protocol")


def test_a_watched_endpoint_records_exhaustion_and_passes_every_failure_on() -> None:
    watch = DescriptorWatch(Clock(), lambda operation: None)
    for error, recorded in ((EMFILE, 1), (ConnectionRefusedError(), 1)):
        failures: list[Failure] = []
        watched(_Endpoint(error), watch).connect(Factory()).addErrback(failures.append)
        assert [f.value for f in failures] == [error]
        assert watch.total == recorded
    results: list[object] = []
    watched(_Endpoint(None), watch).connect(Factory()).addCallback(results.append)
    assert results == ["protocol"]
    assert watched(_Endpoint(None), None).__class__ is _Endpoint  # nothing to record: the endpoint itself


class _ExhaustedReactor(MemoryReactorClock):
    """connectTCP fails as Twisted's does when socket() returns EMFILE."""

    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:
        raise EMFILE


def test_a_tunnel_dial_at_the_descriptor_limit_is_counted_in_the_metric_and_logged() -> None:
    reactor = _ExhaustedReactor()
    metrics = Metrics()
    watch = DescriptorWatch(reactor, metrics.fd_exhausted)
    egress = Egress(reactor, reactor, object(), Policy.parse([]), connect_timeout=5, descriptors=watch)  # type: ignore[arg-type]
    failures: list[Failure] = []
    with capturedLogs() as events:
        egress.connect(ipaddress.ip_address("127.0.0.1"), 443, Factory.forProtocol(Protocol)).addErrback(failures.append)
    [failure] = failures
    assert isinstance(failure.value, Refusal) and failure.value.status == 502  # the client's answer is unchanged
    assert exhaustion_lines(events) == ["1 connect"]
    assert b'navtwist_fd_exhausted_total{operation="connect"} 1.0' in metrics.render()
    watch.stop()


def test_twisted_accept_loop_exhaustion_events_are_recognised() -> None:
    # The two events twisted.internet.tcp._accept logs (compat checks their text is still there).
    assert accept_exhausted({"log_format": "EMFILE encountered; releasing reserved file descriptor."})
    assert accept_exhausted({"log_format": "Could not accept new connection ({acceptError})", "acceptError": "EMFILE"})
    assert accept_exhausted({"log_format": "Could not accept new connection ({acceptError})", "acceptError": "ENFILE"})
    assert not accept_exhausted({"log_format": "Could not accept new connection ({acceptError})",
                                 "acceptError": "ECONNABORTED"})
    assert not accept_exhausted({"log_format": "something else"})


def test_every_line_of_twisteds_accept_recovery_is_recognised() -> None:
    assert accept_exhaustion_line({"log_format": "EMFILE encountered; releasing reserved file descriptor."})
    assert accept_exhaustion_line({"log_format": "EMFILE recovery: Closed socket from {address}"})
    assert accept_exhaustion_line({"log_format": "Re-reserving EMFILE recovery file descriptor."})
    assert accept_exhaustion_line({"log_format": "Could not accept new connection ({acceptError})",
                                   "acceptError": "ENFILE"})
    assert not accept_exhaustion_line({"log_format": "Could not accept new connection ({acceptError})",
                                       "acceptError": "ENOBUFS"})
    assert not accept_exhaustion_line({"log_format": "something else"})
    watch = DescriptorWatch(Clock(), lambda operation: None)
    watch.observe({"log_format": "EMFILE encountered; releasing reserved file descriptor."})
    assert watch.total == 1
    watch.stop()


class _Idle:
    state = "QUIESCENT"

    def __init__(self) -> None:
        self.transport = SimpleNamespace(closed=False)
        self.transport.loseConnection = lambda: setattr(self.transport, "closed", True)


def test_idle_connections_of_all_pools_together_stay_within_the_budget() -> None:
    clock = MemoryReactorClock()
    budget = IdleBudget(3)
    first, second = budget.pool(clock, per_host=128), budget.pool(clock, per_host=128)
    assert first.maxPersistentPerHost == 3  # never more per host than the whole budget
    kept = [_Idle() for _ in range(3)]
    for connection in kept[:2]:
        first._putConnection(("https", b"a", 443), connection)
    second._putConnection(("https", b"b", 443), kept[2])
    over = _Idle()
    second._putConnection(("https", b"c", 443), over)
    assert over.transport.closed and not any(c.transport.closed for c in kept)
    assert budget.idle() == 3
    clock.advance(first.cachedConnectionTimeout + 1)  # idle ones time out: room again
    assert budget.idle() == 0
    again = _Idle()
    second._putConnection(("https", b"c", 443), again)
    assert not again.transport.closed and budget.idle() == 1


def test_the_default_budget_is_a_quarter_of_the_soft_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert IdleBudget.for_soft_limit().limit == soft // 4


def test_the_soft_limit_is_raised_to_the_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"now": (1024, 4096)}
    monkeypatch.setattr(descriptors.resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(descriptors.resource, "setrlimit", lambda which, value: limits.update(now=value))
    assert raise_nofile_limit() == (1024, 4096)
    assert limits["now"] == (4096, 4096)
    assert raise_nofile_limit() == (4096, 4096)  # already there: unchanged


def test_an_unlimited_hard_limit_raises_to_the_kernels_nr_open(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    nr_open = tmp_path / "nr_open"
    nr_open.write_text("1048576\n")
    limits = {"now": (1024, descriptors.resource.RLIM_INFINITY)}
    monkeypatch.setattr(descriptors, "NR_OPEN", nr_open)
    monkeypatch.setattr(descriptors.resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(descriptors.resource, "setrlimit", lambda which, value: limits.update(now=value))
    assert raise_nofile_limit() == (1024, 1048576)
