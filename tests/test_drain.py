"""DrainService, driven by a MemoryReactorClock: idle connections close at once,
busy ones are waited for until the deadline, then cut (streams told, in the
stream, that the proxy is shutting down) and what is left aborted a moment later."""
from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.testing import MemoryReactorClock

from navtwist.service.drain import CUT_GRACE, POLL_INTERVAL, DrainService
from navtwist.testing import RecordingTransport

TIMEOUT = 5.0


@dataclass(eq=False)
class Connection:
    """A listener connection as the drain sees it."""

    is_busy: bool
    transport: RecordingTransport = field(default_factory=RecordingTransport)
    last_response: bool = False
    cut: bool = False

    def busy(self) -> bool:
        return self.is_busy

    def close_idle(self) -> None:
        self.transport.loseConnection()

    def close_after_response(self) -> None:
        self.last_response = True

    def cut_for_drain(self) -> None:
        self.cut = True


@dataclass
class Factory:
    protocols: set[Connection] = field(default_factory=set)
    draining: bool = False
    drain: DrainService | None = None


def _drain(*connections: Connection) -> tuple[Factory, MemoryReactorClock, list[None]]:
    factory, clock, done = Factory(set(connections)), MemoryReactorClock(), []
    drain = factory.drain = DrainService(factory, clock, TIMEOUT)  # type: ignore[arg-type]
    drain.startService()
    drain.stopService().addCallback(done.append)
    return factory, clock, done


def test_nothing_to_drain_stops_at_once() -> None:
    factory, clock, done = _drain()
    assert factory.draining and done == [None]


def test_idle_connection_is_closed_at_once_and_waited_for() -> None:
    idle = Connection(is_busy=False)
    factory, clock, done = _drain(idle)
    # Closed politely (what its transport still holds is sent first), not aborted.
    assert idle.transport.disconnecting and not idle.transport.aborted
    assert done == []  # closing is not gone
    factory.protocols.clear()
    clock.advance(POLL_INTERVAL)
    assert done == [None]


def test_busy_connection_is_left_to_finish() -> None:
    busy = Connection(is_busy=True)
    factory, clock, done = _drain(busy)
    clock.pump([POLL_INTERVAL] * int(TIMEOUT / POLL_INTERVAL / 2))
    assert not busy.transport.disconnecting and done == []
    assert busy.last_response  # its response in flight closes the connection after it
    busy.is_busy = False  # its response ended: idle now, so closed on the next tick
    clock.advance(POLL_INTERVAL)
    assert busy.transport.disconnecting and not busy.transport.aborted
    factory.protocols.clear()
    clock.advance(POLL_INTERVAL)
    assert done == [None]


def test_connection_busy_past_the_deadline_is_cut_then_aborted() -> None:
    busy = Connection(is_busy=True)
    factory, clock, done = _drain(busy)
    clock.advance(TIMEOUT - POLL_INTERVAL)
    assert not busy.cut
    clock.advance(POLL_INTERVAL)
    assert busy.cut and not busy.transport.aborted  # a stream first gets its error event and chunked end…
    clock.pump([POLL_INTERVAL] * int(CUT_GRACE / POLL_INTERVAL - 1))
    assert not busy.transport.aborted
    clock.pump([POLL_INTERVAL] * 2)  # (a tick either way: the clock's sums are floating point)
    assert busy.transport.aborted  # …and what is still there a moment later is aborted
    assert done == []  # the stop waits for the aborted connection to be torn down…
    factory.protocols.clear()
    clock.advance(POLL_INTERVAL)
    assert done == [None]


def test_drain_gives_up_a_second_after_the_deadline() -> None:
    stuck = Connection(is_busy=True)
    factory, clock, done = _drain(stuck)
    clock.pump([POLL_INTERVAL] * int((TIMEOUT + 1) / POLL_INTERVAL - 1))
    assert stuck.transport.aborted and done == []
    clock.pump([POLL_INTERVAL] * 2)
    assert done == [None]  # …but not for ever


def test_connection_cut_cleanly_is_closed_as_idle_before_the_abort() -> None:
    busy = Connection(is_busy=True)
    factory, clock, done = _drain(busy)
    clock.advance(TIMEOUT)
    busy.is_busy = False  # its stream was ended by the cut
    clock.advance(POLL_INTERVAL)
    assert busy.transport.disconnecting and not busy.transport.aborted
    factory.protocols.clear()
    clock.advance(POLL_INTERVAL)
    assert done == [None] and not busy.transport.aborted


def test_when_drained_fires_once_the_stop_has_drained() -> None:
    busy = Connection(is_busy=True)
    factory, clock, done = _drain(busy)
    drain_service_waiters: list[None] = []
    factory.drain.when_drained().addCallback(drain_service_waiters.append)
    clock.advance(POLL_INTERVAL)
    assert drain_service_waiters == []
    factory.protocols.clear()
    clock.advance(POLL_INTERVAL)
    assert drain_service_waiters == [None] and done == [None]
