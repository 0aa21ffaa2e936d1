"""Config reload: SIGHUP and file polling apply valid configs and keep the old on errors."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from navtwist.config import Config, load_config
from navtwist.service.reload import ConfigReloader

ROUTE = "routes:\n  - {{name: {name}, endpoint: 'mock://', model: m, protocols: [openai_chat_completions]}}\n"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "navtwist.yaml"
    p.write_text(ROUTE.format(name="first"))
    return p


@pytest.fixture
def events() -> list[dict]:
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def _reloader(path: Path, applied: list[Config], watch: float | None = None) -> tuple[ConfigReloader, MemoryReactorClock]:
    clock = MemoryReactorClock()
    load = lambda previous=None: load_config(str(path), {}, previous=previous)  # noqa: E731
    return ConfigReloader(load(), load, applied.append, clock, str(path), watch), clock


def _rewrite(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a visible change


def test_valid_config_is_applied(path: Path) -> None:
    applied: list[Config] = []
    reloader, _ = _reloader(path, applied)
    _rewrite(path, ROUTE.format(name="second"))
    assert reloader.reload()
    assert [c.routes[0].name for c in applied] == ["second"]


def test_invalid_config_is_logged_and_the_old_one_kept(path: Path, events: list[dict]) -> None:
    applied: list[Config] = []
    reloader, _ = _reloader(path, applied)
    _rewrite(path, "routes:\n  - {name: x, endpoint: 'ftp://x', model: m, protocols: [openai_chat_completions]}\n")
    assert not reloader.reload()
    assert applied == [] and reloader.current.routes[0].name == "first"
    [event] = [e for e in events if e.get("log_namespace") == "navtwist.reload"]
    assert "routes[0].endpoint" in event["error"]


@pytest.mark.parametrize("key, line", [("listen", "listen: 'tcp:9999'"),
                                       ("upstream_proxy", "upstream_proxy: 'http://127.0.0.1:3129'")])
def test_restart_only_changes_are_reported(path: Path, events: list[dict], key: str, line: str) -> None:
    reloader, _ = _reloader(path, [])
    _rewrite(path, line + "\n" + ROUTE.format(name="first"))
    reloader.reload()
    assert any(e.get("key") == key for e in events)


def test_watch_polls_the_file(path: Path) -> None:
    applied: list[Config] = []
    reloader, clock = _reloader(path, applied, watch=2)
    reloader.startService()
    try:
        clock.advance(2)
        assert applied == []  # unchanged file: nothing reloaded
        _rewrite(path, ROUTE.format(name="second"))
        clock.advance(2)
        assert [c.routes[0].name for c in applied] == ["second"]
        clock.advance(2)
        assert len(applied) == 1
    finally:
        reloader.stopService()


class ThreadedClock(MemoryReactorClock):
    """A clock that records what a signal handler hands to the reactor thread."""

    def __init__(self) -> None:
        super().__init__()
        self.from_thread: list = []

    def callFromThread(self, f, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.from_thread.append(f)


def test_sighup_reloads_through_the_reactor(path: Path) -> None:
    applied: list[Config] = []
    clock = ThreadedClock()
    load = lambda previous=None: load_config(str(path), {}, previous=previous)  # noqa: E731
    reloader = ConfigReloader(load(), load, applied.append, clock, str(path), None)
    previous = signal.getsignal(signal.SIGHUP)
    reloader.startService()
    try:
        _rewrite(path, ROUTE.format(name="second"))
        os.kill(os.getpid(), signal.SIGHUP)
        [reload] = clock.from_thread
        reload()
        assert [c.routes[0].name for c in applied] == ["second"]
    finally:
        reloader.stopService()
    assert signal.getsignal(signal.SIGHUP) == previous


def test_watch_reloads_when_a_watched_secret_file_changes(path: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("one")
    applied: list[Config] = []
    clock = MemoryReactorClock()
    load = lambda previous=None: load_config(str(path), {}, previous=previous)  # noqa: E731
    reloader = ConfigReloader(load(), load, applied.append, clock, str(path), 1.0, watched=lambda config: [str(secret)])
    reloader.startService()
    try:
        clock.advance(1.0)
        assert applied == []
        secret.write_text("rotated")
        clock.advance(1.0)
        assert len(applied) == 1
        clock.advance(1.0)
        assert len(applied) == 1  # no change, no reload
    finally:
        reloader.stopService()
