"""Flow control shared by relays and tunnels: stall detection by progress, bounded socket buffers.

A reader is stalled when it has taken nothing for C{write_stall} seconds, not
when the writer has been paused that long: a slow but steady reader keeps a
writer paused most of the time (Twisted resumes a producer only once its
whole write buffer has drained) and must not be dropped.  Progress is read
from the transport being written to: its own write buffer plus, on Linux,
the kernel's send queue (C{SIOCOUTQ}, bytes the peer has not acknowledged).
Transports that expose neither fall back to counting pause time.

Kernel buffers are bounded per socket (C{limits.socket_buffer_bytes}): left
to autotuning, each slow reader's connection can hold several megabytes in
the kernel, and a sending socket only becomes writable again after a third
of its buffer drained, which hides a slow reader's progress for minutes.
"""
from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from navtwist.compat import write_buffered

_SIOCOUTQ = termios.TIOCOUTQ  # the same request number for sockets on Linux


def socket_transport(transport: object) -> tuple[object, socket.socket] | None:
    """The socket transport under C{transport} (through TLS layers, whose handle is not a socket) and its socket."""
    for _ in range(4):  # a TLS layer or two at most
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
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


def unsent_bytes(transport: object) -> int | None:
    """Bytes written to C{transport} that its peer has not taken yet, or None when it cannot tell.

    Under a TLS layer these are the socket transport's (ciphertext) bytes.
    """
    found = socket_transport(transport)
    transport, handle = found if found is not None else (transport, None)
    pending = write_buffered(transport)
    if pending is None:
        return None
    if handle is not None and handle.type == socket.SOCK_STREAM:
        try:
            pending += struct.unpack("i", fcntl.ioctl(handle.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            pass
    return pending


class StallWatch:
    """Calls C{stalled} when the reader behind C{transport} takes nothing for C{timeout} seconds while paused.

    C{paused} and C{resumed} mirror the writer's producer events.  A busy
    stream pauses and resumes every few dozen kilobytes, so there is at most
    one pending timer: it samples progress every quarter of C{timeout} while
    paused and re-arms itself only while paused.  A resume is progress.
    """

    def __init__(self, clock: IReactorTime, timeout: float, transport: object, stalled: Callable[[], None],
                 unsent: Callable[[object], int | None] = unsent_bytes) -> None:
        self._clock = clock
        self._timeout = timeout
        self._transport = transport
        self._stalled = stalled
        self._unsent = unsent
        self._call: IDelayedCall | None = None
        self._paused = False
        self._progress_at = 0.0
        self._last: int | None = None

    def paused(self) -> None:
        self._paused = True
        self._progress_at = self._clock.seconds()
        self._last = self._unsent(self._transport)
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
        unsent = self._unsent(self._transport)
        if unsent is not None and self._last is not None and unsent < self._last:
            self._progress_at = now
        self._last = unsent
        idle = now - self._progress_at
        if idle >= self._timeout:
            self._paused = False
            self._stalled()
        else:
            self._call = self._clock.callLater(min(self._period(), self._timeout - idle), self._check)
