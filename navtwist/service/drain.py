"""Graceful stop: let in-flight requests, streams and tunnels finish, within a deadline.

On SIGTERM twistd stops the services: the listener stops accepting, idle
connections are closed at once (inside intercepted TLS too; and connections
that become idle while draining, as soon as they do), responses in flight are
their connection's last, and the stop waits until nothing is busy or
C{timeout} seconds have passed.  Then the streams still running are told the
proxy is shutting down and ended cleanly, and what is left a moment later is
aborted.
"""
from __future__ import annotations

import signal

from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from navtwist.interfaces import IServiceReactor
from navtwist.listener import ProxyFactory

log = Logger(namespace="navtwist.drain")

POLL_INTERVAL = 0.1
CUT_GRACE = 0.5  # after the deadline: for streams cut cleanly to reach their clients, before the rest is aborted


class DrainService(service.Service):
    """Delays the end of twistd's shutdown until the proxy has drained."""

    def __init__(self, factory: ProxyFactory, clock: IServiceReactor, timeout: float, handle_sigterm: bool = False) -> None:
        self._factory = factory
        self._clock = clock
        self._timeout = timeout
        self._handle_sigterm = handle_sigterm
        self._stop_requested = False
        self._drained = False
        self._waiting: list[Deferred[None]] = []

    def startService(self) -> None:
        super().startService()
        if self._handle_sigterm:
            # The reactor's own handler (installed once it runs) marks the
            # stop as "killed by SIGTERM"; a drained stop on request is a
            # normal exit, so ours replaces it.
            self._clock.callWhenRunning(signal.signal, signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self._clock.callFromThread(self._stop_reactor)

    def _stop_reactor(self) -> None:
        # A second SIGTERM while draining must not ask a stopping reactor to stop again.
        if not self._stop_requested:
            self._stop_requested = True
            self._clock.stop()

    def when_drained(self) -> Deferred[None]:
        """Fires once a stop has drained: for what must outlive the drain (the
        admin endpoint, whose /readyz answers 503 meanwhile)."""
        if self._drained:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._factory.draining = True
        busy = sum(1 for p in self._factory.protocols if p.busy())
        log.info("draining: {busy} busy connections, up to {timeout:g} s", busy=busy, timeout=self._timeout)
        self._deadline = self._clock.seconds() + self._timeout
        self._cut = False
        self._aborted = False
        self._done: Deferred[None] = Deferred()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(POLL_INTERVAL, now=True)
        return self._done

    def _tick(self) -> None:
        """Close what is idle; finish once every connection is gone.

        An idle connection is closed with loseConnection, which first sends
        what its transport still buffers (the tail of a response a slow
        client has not read yet), so the drain waits for the connection to
        be gone, not merely idle.  At the deadline what is busy is cut (a
        stream ends with an error event and its chunked end, its connection
        then closing as an idle one), C{CUT_GRACE} later the rest is aborted,
        and the stop completes on a later tick, once those connections have
        been torn down (so each request is logged as cut by the proxy, not by
        its upstream, which the reactor's shutdown would otherwise close first).
        """
        protocols = list(self._factory.protocols)
        if not protocols or (self._aborted and self._clock.seconds() >= self._deadline + 1):
            log.info("drained" if not protocols else "drain: giving up on {n} connections", n=len(protocols))
            self._loop.stop()
            self._drained = True
            self._done.callback(None)
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(None)
            return
        now = self._clock.seconds()
        if now >= self._deadline and not self._cut:
            self._cut = True
            log.warn("drain timeout: closing {n} busy connections", n=len(protocols))
            for protocol in protocols:
                protocol.cut_for_drain()
        elif now < self._deadline + CUT_GRACE:
            for protocol in protocols:
                if protocol.busy():
                    protocol.close_after_response()
                elif not protocol.transport.disconnecting:
                    protocol.close_idle()
        elif not self._aborted:
            self._aborted = True
            for protocol in protocols:
                protocol.transport.abortConnection()
