"""Integration: twistd at its file-descriptor limit says so, counts it, and survives.

The proxy is started with a low C{RLIMIT_NOFILE} (soft 96, hard 160); it raises
its soft limit to the hard one at start.  Tunnels to a loopback sink are then
opened until the proxy can no longer dial (each tunnel holds two descriptors
in the proxy), and connections keep arriving after that (accept fails too).
"""
from __future__ import annotations

import resource
import selectors
import socket
import threading
import time
from typing import Iterator

import httpx
import pytest

from conftest import TIMEOUT, _free_port, _recv_head
from routing_helpers import metric_samples, metric_value

pytestmark = pytest.mark.integration

SOFT, HARD = 96, 160
LINE = "out of file descriptors"
MOCK_ROUTE = {"name": "inference.local", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))


@pytest.fixture
def sink() -> Iterator[int]:
    """A loopback TCP server that holds every connection until its peer closes it; yields its port."""
    server = socket.create_server(("127.0.0.1", 0), backlog=1024)
    server.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            for key, _ in selector.select(0.1):
                if key.fileobj is server:
                    conn, _ = server.accept()
                    conn.setblocking(False)
                    selector.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(conn)
                    conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    selector.close()


def _tunnel(port: int, target: int) -> tuple[socket.socket, int]:
    """A client socket after C{CONNECT 127.0.0.1:target}, and the proxy's status (0: the proxy hung up)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    authority = f"127.0.0.1:{target}"
    try:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        status, _, _ = _recv_head(sock)
    except (OSError, AssertionError, ValueError, IndexError):
        status = 0
    return sock, status


def test_at_the_descriptor_limit_the_log_says_so_once_per_interval_and_the_proxy_survives(start_proxy, sink):
    admin_port = _free_port()
    proxy = start_proxy({"routes": [MOCK_ROUTE], "policy": {"allow": [f"127.0.0.1:{sink}"]},
                         "admin_listen": f"tcp:{admin_port}:interface=127.0.0.1"}, preexec_fn=_low_nofile)
    assert f"file descriptor limit (soft RLIMIT_NOFILE): {HARD} (was {SOFT})" in proxy.log_text()

    clients: list[socket.socket] = []
    statuses: list[int] = []
    try:
        for _ in range(HARD):  # more tunnels than could ever fit: two descriptors each
            sock, status = _tunnel(proxy.port, sink)
            clients.append(sock)
            statuses.append(status)
            if status != 200:
                break
        assert statuses[-1] in (0, 502), statuses
        first = proxy.wait_for_log(LINE)
        exhausted_at = time.monotonic()
        # Keep knocking for a while: more refused dials and accepts, no more lines within the interval.
        while time.monotonic() - exhausted_at < 2:
            sock, status = _tunnel(proxy.port, sink)
            clients.append(sock)
            assert status in (0, 502)
        assert proxy.log_text().count(LINE) == 1, first
        # When the interval (10 s) ends, one more line counts what happened meanwhile.
        proxy.wait_for_log(LINE, timeout=12)
        deadline = time.monotonic() + 12
        while proxy.log_text().count(LINE) < 2:
            assert time.monotonic() < deadline, proxy.log_text()
            time.sleep(0.1)
        assert proxy.log_text().count(LINE) == 2
    finally:
        for sock in clients:
            sock.close()
    assert proxy.process.poll() is None, proxy.log_text()
    # Descriptors free again: the proxy serves, and the metric has counted it.
    deadline = time.monotonic() + TIMEOUT
    while True:
        sock, status = _tunnel(proxy.port, sink)
        sock.close()
        if status == 200:
            break
        assert time.monotonic() < deadline, f"no tunnel after the descriptors were freed: {status}"
        time.sleep(0.2)
    samples = metric_samples(httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=TIMEOUT).text)
    assert metric_value(samples, "navtwist_fd_exhausted_total") >= 2
    assert metric_value(samples, "navtwist_fd_exhausted_total", operation="connect") >= 1
