"""Reloading the config without dropping a connection: SIGHUP, or polling the file.

A valid new config takes effect for new requests (routes and policy); calls
already under way keep the routes they started with.  An invalid one is
logged, naming the problem, and the old config stays.  Settings that need a
restart (listen, ca_dir, limits, timeouts, upstream_proxy) are reported, not applied.
"""
from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any, Callable, Sequence

from twisted.application import service
from twisted.internet.interfaces import IReactorCore
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from navtwist.config import Config, ConfigError
from navtwist.interfaces import IServiceReactor

log = Logger(namespace="navtwist.reload")

_RESTART_ONLY = ("listen", "ca_dir", "limits", "timeouts", "upstream_proxy")


def _file_state(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class ConfigReloader(service.Service):
    """Re-reads the config on SIGHUP and, if asked, whenever the file changes."""

    def __init__(
        self,
        current: Config,
        load: Callable[[Config], Config],
        apply: Callable[[Config], None],
        reactor: IServiceReactor,
        path: str | None,
        watch_interval: float | None,
        watched: Callable[[Config], Sequence[str]] = lambda config: (),
    ) -> None:
        self.current = current
        self._load = load
        self._pollered = watched
        self._apply = apply
        self._reactor = reactor
        self._path = path
        self._poll_interval = watch_interval
        self._poller: LoopingCall | None = None
        self._seen = self._states()
        self._previous_handler: Callable[[int, FrameType | None], Any] | int | None = None

    def startService(self) -> None:
        super().startService()
        if IReactorCore.providedBy(self._reactor):
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        if self._path and self._poll_interval:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self._reactor
            self._poller.start(self._poll_interval, now=False)

    def stopService(self) -> None:
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
        return super().stopService()

    def _on_sighup(self, signum: int, frame: object) -> None:
        # Signal handlers run between bytecodes of whatever the reactor was
        # doing: hand the work to the reactor thread.
        self._reactor.callFromThread(self.reload)

    def _states(self) -> tuple[tuple[int, int, int] | None, ...]:
        """The config file's state and each watched file's (the credentials' secrets)."""
        paths = ([self._path] if self._path else []) + list(self._pollered(self.current))
        return tuple(_file_state(path) for path in paths)

    def _poll(self) -> None:
        states = self._states()
        if states and states[0] is not None and states != self._seen:
            self._seen = states
            self.reload()

    def reload(self) -> bool:
        """Load and apply the config; on any problem keep the old one."""
        try:
            config = self._load(self.current)
        except ConfigError as e:
            log.error("config reload failed, keeping the current config: {error}", error=str(e))
            return False
        for key in _RESTART_ONLY:
            if getattr(config, key) != getattr(self.current, key):
                log.warn("config reload: {key} changed; it takes effect after a restart", key=key)
        self._apply(config)
        self.current = config
        self._seen = self._states()
        log.info("config reloaded: {routes} routes, {rules} policy rules",
                 routes=len(config.routes), rules=len(config.policy.rules))
        return True
