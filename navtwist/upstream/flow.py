"""Flow control shared by relays and tunnels: stall detection by progress, bounded socket buffers.

A reader is stalled when it has taken nothing for C{write_stall} seconds, not
when the writer has been paused that long: a slow but steady reader keeps a
writer paused most of the time (Twisted resumes a producer only once its
whole write buffer has drained) and must not be dropped.  Progress is a
count that only grows while the reader takes bytes: on a TCP socket the
kernel's count of bytes the peer acknowledged (C{TCP_INFO} C{bytes_acked}).
A count of what is still unsent would not do: the writer refills what the
reader drained, and a write buffer that stays full hides a reader that reads.
Transports without a socket fall back to their Twisted write buffer
shrinking, and those without one to counting pause time.

Kernel buffers are bounded per socket (C{limits.socket_buffer_bytes}): left
to autotuning, each slow reader's connection can hold several megabytes in
the kernel, and a sending socket only becomes writable again after a third
of its buffer drained, which hides a slow reader's progress for minutes.
"""
from __future__ import annotations

import socket
import struct
from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from navtwist.compat import write_buffered

_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux
_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64, Linux 4.1+) in struct tcp_info


def socket_transport(transport: object) -> tuple[object, socket.socket] | None:
    """The socket transport under C{transport} (through TLS layers, whose handle is not a socket) and its socket."""
    for _ in range(4):  # a TLS layer or two at most
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if not isinstance(handle, socket.socket):
            # startTLS gives a TCP transport its TLS layer's getHandle; the socket stays its own.
            handle = getattr(transport, "socket", None)
        if isinstance(handle, socket.socket):
            return transport, handle
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


def bound_socket_buffers(transport: object, size: int) -> None:
    """Cap the send and receive buffers of C{transport}'s socket at C{size} bytes (the kernel doubles it)."""
    found = socket_transport(transport)
    if found is None:
        return
    handle = found[1]
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            handle.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            return


def accepted_bytes(transport: object) -> int | None:
    """A count that grows as C{transport}'s peer takes the bytes written to it, or None when it cannot tell.

    On a TCP socket (under a TLS layer too: ciphertext), the bytes the peer
    acknowledged; without one, minus what the Twisted write buffer holds.
    """
    found = socket_transport(transport)
    if found is None:
        pending = write_buffered(transport)
        return None if pending is None else -pending
    handle = found[1]
    if _TCP_INFO is None or handle.type != socket.SOCK_STREAM:
        return None
    try:
        info = handle.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _BYTES_ACKED + 8)
    except OSError:
        return None
    if len(info) < _BYTES_ACKED + 8:
        return None
    acked: int = struct.unpack_from("Q", info, _BYTES_ACKED)[0]
    return acked


class StallWatch:
    """Calls C{stalled} when the reader behind C{transport} takes nothing for C{timeout} seconds while paused.

    C{paused} and C{resumed} mirror the writer's producer events.  A busy
    stream pauses and resumes every few dozen kilobytes, so there is at most
    one pending timer: it samples progress every quarter of C{timeout} while
    paused and re-arms itself only while paused.  A resume is progress.
    """

    def __init__(self, clock: IReactorTime, timeout: float, transport: object, stalled: Callable[[], None],
                 accepted: Callable[[object], int | None] = accepted_bytes) -> None:
        self._clock = clock
        self._timeout = timeout
        self._transport = transport
        self._stalled = stalled
        self._accepted = accepted
        self._call: IDelayedCall | None = None
        self._paused = False
        self._progress_at = 0.0
        self._last: int | None = None

    def paused(self) -> None:
        self._paused = True
        self._progress_at = self._clock.seconds()
        self._last = self._accepted(self._transport)
        if self._call is None:
            self._call = self._clock.callLater(self._period(), self._check)

    def resumed(self) -> None:
        self._paused = False

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._paused = False

    def _period(self) -> float:
        return self._timeout / 4

    def _check(self) -> None:
        self._call = None
        if not self._paused:
            return
        now = self._clock.seconds()
        accepted = self._accepted(self._transport)
        if accepted is not None and self._last is not None and accepted > self._last:
            self._progress_at = now
        self._last = accepted
        idle = now - self._progress_at
        if idle >= self._timeout:
            self._paused = False
            self._stalled()
        else:
            self._call = self._clock.callLater(min(self._period(), self._timeout - idle), self._check)
