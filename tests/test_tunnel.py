"""CONNECT tunnel splicing: flow control both ways, half-close, stalls."""
from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from navtwist.egress.tunnel import Splice, TunnelUpstream


class HalfCloseTransport(StringTransport):
    """StringTransport that also records half-closes and aborts."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


def _splice(clock: MemoryReactorClock, early: bytes = b"") -> tuple[Splice, HalfCloseTransport, HalfCloseTransport, TunnelUpstream]:
    client, upstream = HalfCloseTransport(), HalfCloseTransport()
    splice = Splice(client, clock, write_stall_timeout=10)
    protocol = TunnelUpstream(splice)
    protocol.makeConnection(upstream)
    splice.start(upstream, early)
    return splice, client, upstream, protocol


def test_bytes_flow_both_ways_unchanged(clock: MemoryReactorClock) -> None:
    splice, client, upstream, protocol = _splice(clock, early=b"hello")
    splice.from_client(b" world")
    protocol.dataReceived(b"\x00\x01binary")
    assert upstream.value() == b"hello world"
    assert client.value() == b"\x00\x01binary"
    assert (splice.bytes_up, splice.bytes_down) == (11, 8)


def test_each_side_is_the_others_producer(clock: MemoryReactorClock) -> None:
    _, client, upstream, _ = _splice(clock)
    assert client.streaming and upstream.streaming
    client.producer.pauseProducing()  # client's buffer full → stop reading upstream
    assert upstream.producerState == "paused"
    client.producer.resumeProducing()
    assert upstream.producerState == "producing"
    upstream.producer.pauseProducing()
    assert client.producerState == "paused"


def test_half_close_is_passed_on_and_both_close_when_both_ended(clock: MemoryReactorClock) -> None:
    splice, client, upstream, protocol = _splice(clock)
    splice.client_eof()
    assert upstream.write_closed and not client.disconnecting
    protocol.dataReceived(b"late answer")  # the other direction still flows
    assert client.value() == b"late answer"
    protocol.readConnectionLost()
    assert client.write_closed
    assert client.disconnecting and upstream.disconnecting


def test_upstream_loss_closes_client_after_pending_data(clock: MemoryReactorClock) -> None:
    _, client, upstream, protocol = _splice(clock)
    protocol.dataReceived(b"tail")
    protocol.connectionLost()
    assert client.disconnecting and not client.aborted and client.value() == b"tail"


def test_stalled_reader_ends_tunnel_after_timeout(clock: MemoryReactorClock) -> None:
    _, client, upstream, _ = _splice(clock)
    client.producer.pauseProducing()
    clock.advance(9)
    client.producer.resumeProducing()  # drained in time: no stall
    client.producer.pauseProducing()
    clock.advance(9.9)
    assert not client.aborted
    clock.advance(0.2)
    assert client.aborted and upstream.aborted


def test_close_cancels_stall_timers(clock: MemoryReactorClock) -> None:
    splice, client, _, _ = _splice(clock)
    client.producer.pauseProducing()
    splice.close()
    assert clock.getDelayedCalls() == []
