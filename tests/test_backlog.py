"""The listen backlog: 1024 (capped by somaxconn) unless the endpoint string names one."""
from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import endpoints
from twisted.internet.testing import MemoryReactor

from conftest import running_service
from navtwist.service.backlog import DEFAULT_BACKLOG, kernel_backlog_cap, with_backlog


@pytest.mark.parametrize(("given", "expected"), [
    ("tcp:3128:interface=127.0.0.1", "tcp:3128:interface=127.0.0.1:backlog=1024"),
    ("tcp6:port=3128:interface=\\:\\:1", "tcp6:port=3128:interface=\\:\\:1:backlog=1024"),
    ("unix:/run/navtwist\\:a.sock", "unix:/run/navtwist\\:a.sock:backlog=1024"),
    ("tcp:3128:backlog=10", "tcp:3128:backlog=10"),  # the operator's choice stays
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),  # the socket's creator chose
])
def test_backlog_added_unless_named(given: str, expected: str) -> None:
    assert with_backlog(given, cap=4096) == expected


def test_backlog_capped_by_the_kernel() -> None:
    assert with_backlog("tcp:3128", cap=128) == "tcp:3128:backlog=128"


def test_kernel_cap_read_from_proc(tmp_path: Path) -> None:
    path = tmp_path / "somaxconn"
    path.write_text("4096\n")
    assert kernel_backlog_cap(path) == 4096
    assert kernel_backlog_cap(tmp_path / "missing") is None


def test_the_endpoint_listens_with_it() -> None:
    reactor = MemoryReactor()
    endpoints.serverFromString(reactor, with_backlog("tcp:0:interface=127.0.0.1", cap=4096)).listen(object())
    [(_port, _factory, backlog, _interface)] = reactor.tcpServers
    assert backlog == DEFAULT_BACKLOG


def test_service_listens_with_the_default_backlog(tmp_path: Path) -> None:
    with running_service("--listen", "tcp:3999:interface=127.0.0.1", "--ca-dir", str(tmp_path / "ca")) as reactor:
        [(_port, _factory, backlog, _interface)] = reactor.tcpServers
        assert backlog == min(DEFAULT_BACKLOG, kernel_backlog_cap() or DEFAULT_BACKLOG)
