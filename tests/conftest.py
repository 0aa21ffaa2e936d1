"""Fixtures for the integration tests: a local upstream, the real twistd proxy, clients.

Everything runs on 127.0.0.1.  The proxy is the real C{twistd -n navtwist}
subprocess; its log is checked for tracebacks when each test ends.  At the
end, what unit tests share: captured logs, recorded metrics, restored signal
handlers and the plugin's service on a memory reactor.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from upstream import INFERENCE, Upstream, routes_config

TWISTD = Path(sys.executable).with_name("twistd")
TIMEOUT = 10.0  # every client operation and wait in these tests is bounded by this


# --- the upstream --------------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# --- the proxy -----------------------------------------------------------------------


@dataclass
class Proxy:
    """A running C{twistd -n navtwist}."""

    port: int
    ca_path: Path
    process: subprocess.Popen
    log_path: Path
    config_path: Path
    base: dict[str, Any]  # listen, ca_dir and drain_timeout, kept when the config is rewritten

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def write_config(self, config: dict[str, Any] | str) -> None:
        """Replace the config file (for reloads): a dict (base kept) or raw text."""
        text = config if isinstance(config, str) else yaml.safe_dump({**self.base, **config})
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.config_path)  # atomically, as editors and config managers do

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        """Wait until the log contains C{text}; returns the log."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log_text()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout} s; log:\n{log}")
            time.sleep(0.05)
        return log

    def rss_bytes(self) -> int:
        """The proxy's resident set size, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                value, unit = line.split()[1:3]
                assert unit == "kB", line
                return int(value) * 1024
        raise AssertionError("no VmRSS in /proc status")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(proxy: Proxy, deadline: float) -> None:
    listening = f"ProxyFactory starting on {proxy.port}"
    while listening not in proxy.log_text():
        if proxy.process.poll() is not None:
            raise AssertionError(f"twistd exited with {proxy.process.returncode}:\n{proxy.log_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"twistd not listening after {TIMEOUT} s:\n{proxy.log_text()}")
        time.sleep(0.05)


def _stop(proxy: Proxy) -> None:
    if proxy.process.poll() is None:
        proxy.process.send_signal(signal.SIGTERM)
        try:
            proxy.process.wait(5)
        except subprocess.TimeoutExpired:
            proxy.process.kill()
            proxy.process.wait(5)
            raise AssertionError(f"twistd ignored SIGTERM for 5 s:\n{proxy.log_text()}") from None
    # SIGTERM drains and stops navtwist normally: exit status 0.
    if proxy.process.returncode != 0 or "Server Shut Down." not in proxy.log_text():
        raise AssertionError(f"twistd exited with {proxy.process.returncode}:\n{proxy.log_text()}")


class ProxyStarter:
    """Starts C{twistd -n navtwist} processes in one directory and, at the end,
    stops them and checks that each shut down cleanly and logged no error."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self.started: list[Proxy] = []

    def __call__(self, config: dict[str, Any], args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> Proxy:
        """Start one with C{config} (listen, ca_dir and a short drain filled in),
        C{args} after C{--config PATH}, C{env} added to the environment, C{preexec_fn} run in the child."""
        proxy = spawn_proxy(config, self._directory, len(self.started), args, env, preexec_fn)
        self.started.append(proxy)
        _wait_listening(proxy, time.monotonic() + TIMEOUT)
        return proxy

    def close(self) -> None:
        problems = []
        for proxy in self.started:
            for check in (_stop, assert_log_clean):
                try:
                    check(proxy)
                except AssertionError as e:
                    problems.append(str(e))
        assert not problems, "\n\n".join(problems)


def spawn_proxy(config: dict[str, Any], directory: Path, index: int, args: tuple[str, ...] = (),
                env: dict[str, str] | None = None, preexec_fn: Callable[[], None] | None = None) -> Proxy:
    """Start C{twistd -n navtwist} with C{config}; does not wait for it to listen."""
    port = _free_port()
    # A short drain keeps teardown quick when a test leaves a stream in flight.
    base = {"listen": f"tcp:{port}:interface=127.0.0.1", "ca_dir": str(directory / f"ca{index}"), "drain_timeout": 2}
    config_path = directory / f"navtwist{index}.yaml"
    config_path.write_text(yaml.safe_dump({**base, **config}), encoding="utf-8")
    log_path = directory / f"twistd{index}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "navtwist", "--config", str(config_path), *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=directory,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=preexec_fn,
        )
    ca_dir = Path(config.get("ca_dir", base["ca_dir"]))
    return Proxy(port, ca_dir / "ca.pem", process, log_path, config_path, base)


def assert_log_clean(proxy: Proxy) -> None:
    log = proxy.log_text()
    assert "Traceback" not in log and "Unhandled Error" not in log, f"twistd logged an error:\n{log}"


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[ProxyStarter]:
    """Factory: C{start_proxy(config, args=(), env=None)} starts twistd (see L{ProxyStarter})."""
    starter = ProxyStarter(tmp_path)
    yield starter
    starter.close()


@pytest.fixture
def proxy(start_proxy: Callable[[dict[str, Any]], Proxy], upstream: Upstream) -> Proxy:
    """The proxy with the standard routes to the test's upstream."""
    return start_proxy(routes_config(upstream.url))


# --- clients ---------------------------------------------------------------------------


def _client(proxy: Proxy, module: Any, verify: ssl.SSLContext | None = None, sent: list | None = None) -> Any:
    """An httpx-API client (C{httpx}, or C{httpx2} for the SDKs) through C{proxy};
    the requests it sends are appended to C{sent}."""
    if verify is None:
        verify = ssl.create_default_context(cafile=str(proxy.ca_path))
    hooks = {} if sent is None else {"request": [sent.append]}
    return module.Client(proxy=proxy.url, verify=verify, timeout=TIMEOUT, trust_env=False, event_hooks=hooks)


@pytest.fixture
def client_requests() -> list:
    """The requests the SDK clients sent (httpx2.Request objects), in order."""
    return []


@pytest.fixture
def make_client(proxy: Proxy) -> Iterator[Callable[..., httpx.Client]]:
    """Factory: C{make_client(verify=None)} is an httpx.Client through the proxy,
    trusting the proxy's CA unless another C{verify} context is given."""
    clients: list[httpx.Client] = []

    def make(verify: ssl.SSLContext | None = None) -> httpx.Client:
        clients.append(_client(proxy, httpx, verify))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def http_client(make_client: Callable[..., httpx.Client]) -> httpx.Client:
    return make_client()


@pytest.fixture
def openai_client(proxy: Proxy, client_requests: list) -> Iterator[Any]:
    import httpx2
    import openai

    with _client(proxy, httpx2, sent=client_requests) as http:
        yield openai.OpenAI(base_url=f"https://{INFERENCE}/v1", api_key="sk-client-secret",
                            http_client=http, max_retries=0, timeout=TIMEOUT)


@pytest.fixture
def anthropic_client(proxy: Proxy, client_requests: list) -> Iterator[Any]:
    import anthropic
    import httpx2

    with _client(proxy, httpx2, sent=client_requests) as http:
        yield anthropic.Anthropic(base_url=f"https://{INFERENCE}", api_key="sk-ant-client",
                                  http_client=http, max_retries=0, timeout=TIMEOUT)


def _recv_head(sock: socket.socket, buffered: bytes = b"") -> tuple[int, bytes, bytes]:
    """Read an HTTP response head; returns (status, head, bytes read past it)."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed inside the response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, rest


class Tunnel:
    """A hand-made client: CONNECT through the proxy, then TLS, with plain socket calls."""

    def __init__(self, proxy: Proxy, rcvbuf: int | None = None, mss: int | None = None) -> None:
        raw = socket.socket()
        raw.settimeout(TIMEOUT)
        if rcvbuf is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: fixes the window
        if mss is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        raw.connect(("127.0.0.1", proxy.port))
        raw.sendall(f"CONNECT {INFERENCE}:443 HTTP/1.1\r\nHost: {INFERENCE}:443\r\n\r\n".encode())
        status, head, rest = _recv_head(raw)
        assert status == 200 and not rest, head
        context = ssl.create_default_context(cafile=str(proxy.ca_path))
        self.sock = context.wrap_socket(raw, server_hostname=INFERENCE)
        self.buffer = b""

    def request(self, method: str, path: str, body: Any = None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: {INFERENCE}\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer sk-client-secret\r\ncontent-length: {len(payload)}\r\n\r\n".encode() + payload
        )

    def read_head(self) -> tuple[int, bytes]:
        status, head, self.buffer = _recv_head(self.sock)
        return status, head

    def recv(self, size: int = 65536) -> bytes:
        """Up to C{size} bytes of what follows; b"" at the end of the connection."""
        if self.buffer:
            data, self.buffer = self.buffer[:size], self.buffer[size:]
            return data
        return self.sock.recv(size)

    def read_until(self, predicate: Callable[[bytes], bool]) -> bytes:
        """Read until C{predicate(everything read)} holds."""
        data = b""
        while not predicate(data):
            chunk = self.recv()
            if not chunk:
                raise AssertionError(f"connection closed; got {data!r}")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def open_tunnel(proxy: Proxy) -> Iterator[Callable[..., Tunnel]]:
    """Factory for L{Tunnel}s to the test's proxy; all are closed at teardown."""
    tunnels: list[Tunnel] = []

    def open_(rcvbuf: int | None = None) -> Tunnel:
        tunnels.append(Tunnel(proxy, rcvbuf))
        return tunnels[-1]

    yield open_
    for tunnel in tunnels:
        tunnel.close()


@pytest.fixture
def proxy_request(proxy: Proxy) -> Callable[[bytes], tuple[int, bytes, bytes]]:
    """Send raw bytes to the proxy itself; returns (status, head, body).

    The body is read to its content-length, or else until the proxy closes.
    """

    def send(request: bytes) -> tuple[int, bytes, bytes]:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
            sock.sendall(request)
            status, head, body = _recv_head(sock)
            lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n")[1:]
                       if line.lower().startswith(b"content-length:")]
            while (not lengths or len(body) < int(lengths[0])) and (chunk := sock.recv(65536)):
                body += chunk
        return status, head, body

    return send


# --- a proxy shared by the tests of one module -----------------------------------------


@pytest.fixture(scope="module")
def start_module_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyStarter]:
    """Like L{start_proxy}, for a proxy that all the tests of a module share:
    started once, stopped and its log checked after the module's last test."""
    starter = ProxyStarter(tmp_path_factory.mktemp("module-proxy"))
    yield starter
    starter.close()


# --- for unit tests ------------------------------------------------------------------------


@pytest.fixture
def logs() -> Iterator[list[dict]]:
    """Every Twisted log event emitted during the test (the observer goes even when the test fails)."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


class RecordingMetrics:
    """A metrics listener for the inference path that keeps the records and upstream errors it is told of."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.upstream_errors: list[str] = []

    def request_finished(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def stream_started(self) -> None:
        pass

    def stream_ended(self) -> None:
        pass

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors.append(kind)


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """Puts back the SIGINT and SIGUSR1 handlers: twistd's start-up and the log rotation
    install their own, which must not outlive the test in pytest's process."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGUSR1)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@contextmanager
def running_service(*argv: str) -> Iterator[MemoryReactorClock]:
    """The service the twistd plugin makes from C{argv}, started on a memory reactor for the block."""
    from navtwist.service.server_tap import Options, make_service  # not for every session that loads conftest

    options = Options()
    options.parseOptions(list(argv))
    reactor = MemoryReactorClock()
    service = make_service(options["navtwist-config"], reactor)
    service.startService()
    try:
        yield reactor
    finally:
        service.stopService()
