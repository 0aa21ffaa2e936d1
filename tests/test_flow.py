"""Stall detection by progress and bounded socket buffers (relays and tunnels)."""
from __future__ import annotations

import socket
import struct
import time
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from navtwist.testing import Harness, make_harness
from navtwist.egress.tunnel import Splice
from navtwist.upstream.flow import StallWatch, accepted_bytes, bound_socket_buffers

TIMEOUT = 20.0


class Draining(StringTransport):
    """A transport with Twisted's write-buffer attributes, drained by hand like a slow reader would."""

    def __init__(self, buffered: int = 256 * 1024) -> None:
        super().__init__()
        self.dataBuffer = b"x" * buffered
        self.offset = 0
        self._tempDataLen = 0

    def drain(self, count: int) -> None:
        self.offset = min(len(self.dataBuffer), self.offset + count)


def tick(clock: MemoryReactorClock, seconds: float) -> None:
    """Advance in one-second steps, as a real reactor would run the timers."""
    for _ in range(int(seconds)):
        clock.advance(1)


def watch(transport: object) -> tuple[MemoryReactorClock, StallWatch, list[bool]]:
    clock = MemoryReactorClock()
    stalled: list[bool] = []
    return clock, StallWatch(clock, TIMEOUT, transport, lambda: stalled.append(True)), stalled


def test_reader_taking_bytes_slowly_is_never_stalled() -> None:
    transport = Draining()
    clock, stall, stalled = watch(transport)
    stall.paused()
    for _ in range(int(TIMEOUT * 10)):  # paused ten times the timeout, reading 1 KB/s throughout
        clock.advance(1)
        transport.drain(1000)
    assert not stalled


def test_reader_that_stops_taking_bytes_is_stalled_after_the_timeout() -> None:
    transport = Draining()
    clock, stall, stalled = watch(transport)
    stall.paused()
    tick(clock, TIMEOUT / 2)
    transport.drain(1000)  # progress, seen at the next sample
    tick(clock, TIMEOUT - 1)
    assert not stalled
    tick(clock, TIMEOUT / 4 + 1)  # noticed at the next sample at the latest
    assert stalled == [True]


def test_without_progress_information_a_pause_longer_than_the_timeout_stalls() -> None:
    clock, stall, stalled = watch(StringTransport())
    stall.paused()
    clock.advance(TIMEOUT - 0.1)
    assert not stalled
    clock.advance(0.2)
    assert stalled == [True]


def test_a_resume_is_progress() -> None:
    clock, stall, stalled = watch(StringTransport())
    for _ in range(10):
        stall.paused()
        clock.advance(TIMEOUT * 0.9)
        stall.resumed()
    assert not stalled
    assert len(clock.getDelayedCalls()) <= 1  # one pending check, not one per pause


class _KernelSocket(socket.socket):
    """A socket whose TCP_INFO reports C{acked}: the bytes its peer has acknowledged, set by hand."""

    acked = 0

    def getsockopt(self, level: int, option: int, buflen: int = 0) -> Any:
        if (level, option) != (socket.IPPROTO_TCP, socket.TCP_INFO):
            return super().getsockopt(level, option, buflen)
        return bytes(120) + struct.pack("Q", self.acked) + bytes(max(0, buflen - 128))


class _StartedTLS(Draining):
    """Like Twisted's TCP transport after C{startTLS}: its getHandle is the TLS layer's (no socket),
    its own socket is still its C{socket}, its write buffer holds ciphertext."""

    def __init__(self) -> None:
        super().__init__(buffered=64 * 1024)
        self.socket = _KernelSocket()

    def getHandle(self) -> object:
        return object()  # an OpenSSL Connection

    def reader_takes(self, count: int) -> None:
        """The reader takes C{count} bytes; the writer refills both buffers at once (still paused)."""
        self.socket.acked += count


def test_reader_accepting_bytes_under_tls_is_not_stalled_while_the_buffers_are_refilled() -> None:
    transport = _StartedTLS()
    clock, stall, stalled = watch(transport)
    try:
        stall.paused()
        for _ in range(int(TIMEOUT * 4)):  # the unsent count never falls: what was taken was refilled
            clock.advance(1)
            transport.reader_takes(2000)
        assert not stalled
        tick(clock, TIMEOUT + TIMEOUT / 4 + 1)  # now it takes nothing
        assert stalled == [True]
    finally:
        transport.socket.close()


def test_relay_keeps_a_slow_reading_client(harness_transport: tuple[Harness, Draining]) -> None:
    harness, transport = harness_transport
    harness.send("POST", "/v1/chat/completions", b'{"stream":true}')
    from navtwist.testing import FakeResponse
    response = FakeResponse()
    harness.agent.calls[0].deferred.callback(response)
    harness.channel.pauseProducing()
    for _ in range(int(TIMEOUT * 4)):
        harness.clock.advance(1)
        transport.drain(2000)
    assert not getattr(transport, "aborted", False) and not transport.disconnecting
    tick(harness.clock, TIMEOUT * 1.5)  # now it reads nothing
    assert getattr(transport, "aborted", False) or transport.disconnecting
    harness.disconnect()
    assert response.transport.stopped


@pytest.fixture
def harness_transport() -> tuple[Harness, Draining]:
    routes = {"routes": [{"name": "inference.local", "endpoint": "http://upstream.test/v1", "model": "m",
                          "protocols": ["openai_chat_completions"], "api_key": "k"}]}
    harness = make_harness(routes, write_stall=TIMEOUT)
    transport = Draining()
    harness.channel.makeConnection(transport)
    harness.transport = transport
    return harness, transport


def test_tunnel_keeps_a_slow_reading_side() -> None:
    clock = MemoryReactorClock()
    client, upstream = Draining(), Draining()
    splice = Splice(client, clock, TIMEOUT)
    splice.start(upstream)
    client.producer.pauseProducing()  # the client's buffer is full: the upstream is paused
    assert upstream.producerState == "paused"
    for _ in range(int(TIMEOUT * 4)):
        clock.advance(1)
        client.drain(500)
    assert not client.disconnecting and not upstream.disconnecting
    tick(clock, TIMEOUT * 1.5)
    assert getattr(client, "aborted", False) or client.disconnecting


def _fill(sock: socket.socket) -> None:
    """Write to non-blocking C{sock} until its send buffer is full."""
    try:
        while True:
            sock.send(b"y" * 4096)
    except BlockingIOError:
        pass


@pytest.mark.integration
def test_accepted_bytes_grow_as_the_peer_reads_though_the_send_queue_is_refilled() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    writer = socket.create_connection(server.getsockname())
    reader, _ = server.accept()
    try:
        bound_socket_buffers(_Handle(writer), 16384)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        writer.setblocking(False)
        _fill(writer)
        before = accepted_bytes(_Handle(writer))
        assert before is not None and before > 0
        assert writer.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 2 * 16384
        got = 0
        while got < 8192:
            got += len(reader.recv(8192))
        deadline = time.monotonic() + 5
        while (after := accepted_bytes(_Handle(writer))) == before and time.monotonic() < deadline:
            time.sleep(0.01)  # the window update is on its way
        _fill(writer)  # what the reader took is refilled: nothing less is unsent than before
        assert after is not None and after > before
        assert (accepted_bytes(_Handle(writer)) or 0) >= after
    finally:
        for sock in (writer, reader, server):
            sock.close()


class _Handle:
    """A transport-shaped view of a plain socket: empty Twisted buffer, the socket as handle."""

    dataBuffer = b""
    offset = 0
    _tempDataLen = 0

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def getHandle(self) -> socket.socket:
        return self._sock


class _TLSLayer:
    """Like TLSMemoryBIOProtocol as a transport: its handle is not a socket; the socket transport is below."""

    def __init__(self, below: object) -> None:
        self.transport = below

    def getHandle(self) -> object:
        return object()


@pytest.mark.integration
def test_socket_buffers_bounded_under_a_tls_layer() -> None:
    with socket.socket() as sock:
        bound_socket_buffers(_TLSLayer(_Handle(sock)), 32768)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 32768
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 32768
