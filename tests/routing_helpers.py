"""Helpers for the routing and service integration tests.

Fixtures (import them into a test module to use them):

- C{make_upstream()}: a factory of extra L{Upstream} servers (primary,
  secondary, ...), all stopped at teardown.
- C{not_tls}: a L{NotTLS} port.

(C{start_proxy(config, args=(), env=None)} in conftest takes extra twistd
arguments such as C{--watch} and environment; its proxies can rewrite their
config file for reloads.)

Also: scripts the stock upstream lacks (a trickled JSON body, a stream fed
event by event), a port that speaks plain HTTP where TLS is expected, SDK
clients and a narrow tunnel for any proxy, the kernel's socket queues, and
parsers for the proxy's request log lines and /metrics.
"""
from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml

from conftest import TIMEOUT, TWISTD, Proxy, Tunnel, _client, _free_port
from upstream import INFERENCE, OPENAI_MODEL, Exchange, Script, Upstream, _Connection, sse

# --- upstreams ------------------------------------------------------------------------


@pytest.fixture
def make_upstream() -> Iterator[Callable[[], Upstream]]:
    """Factory of extra upstreams, each with its own port and script."""
    servers: list[Upstream] = []

    def make() -> Upstream:
        server = Upstream()
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


class NotTLS:
    """A port where TLS is expected but plain HTTP answers: every connection gets
    an HTTP/1.1 400 at once and is closed.  Counts the connections it accepted."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.accepted = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="not-tls", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.accepted += 1
            with conn:
                conn.settimeout(1)
                try:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                except OSError:
                    pass

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def not_tls() -> Iterator[NotTLS]:
    server = NotTLS()
    try:
        yield server
    finally:
        server.stop()


# --- event builders -------------------------------------------------------------------


def openai_chunk(delta: dict[str, Any] | None, finish: str | None = None, model: str = OPENAI_MODEL,
                 **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return sse({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
                "choices": choices, **extra})


def openai_events_with_usage(parts: list[str], prompt_tokens: int, completion_tokens: int) -> tuple[bytes, ...]:
    """A chat stream whose final chunk carries usage, as with stream_options.include_usage."""
    events = [openai_chunk({"role": "assistant", "content": parts[0]})]
    events += [openai_chunk({"content": text}) for text in parts[1:]]
    events.append(openai_chunk({}, "stop"))
    events.append(openai_chunk(None, usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                            "total_tokens": prompt_tokens + completion_tokens}))
    events.append(sse("[DONE]"))
    return tuple(events)


# --- the proxy ------------------------------------------------------------------------


def run_twistd(config: dict[str, Any], tmp_path: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run twistd with C{config} to completion (for configs it must refuse)."""
    config_path = tmp_path / "refused.yaml"
    config_path.write_text(yaml.safe_dump({"listen": f"tcp:{_free_port()}:interface=127.0.0.1",
                                           "ca_dir": str(tmp_path / "refused-ca"), **config}), encoding="utf-8")
    return subprocess.run([str(TWISTD), "-n", "--pidfile=", "navtwist", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


# --- clients --------------------------------------------------------------------------


@contextmanager
def openai_through(proxy: Proxy, sent: list | None = None) -> Iterator[Any]:
    """An openai SDK client (max_retries=0) through C{proxy}."""
    import httpx2
    import openai

    with _client(proxy, httpx2, sent=sent) as http:
        yield openai.OpenAI(base_url=f"https://{INFERENCE}/v1", api_key="sk-client-secret",
                            http_client=http, max_retries=0, timeout=TIMEOUT)


@contextmanager
def anthropic_through(proxy: Proxy) -> Iterator[Any]:
    """An anthropic SDK client (max_retries=0) through C{proxy}."""
    import anthropic
    import httpx2

    with _client(proxy, httpx2) as http:
        yield anthropic.Anthropic(base_url=f"https://{INFERENCE}", api_key="sk-ant-client",
                                  http_client=http, max_retries=0, timeout=TIMEOUT)


@contextmanager
def httpx_through(proxy: Proxy) -> Iterator[httpx.Client]:
    """A plain httpx client through C{proxy}, trusting its CA."""
    with _client(proxy, httpx) as client:
        yield client


# --- the proxy's log and metrics ---------------------------------------------------------

_REQUEST_LINE = re.compile(r"\[navtwist\.exchange#(?:info|warn)\] request (?P<fields>.*)$")  # failures are warnings
_FIELD = re.compile(r"(\w+)=(\S*)")


def request_records(log: str) -> list[dict[str, str]]:
    """The fields of every per-request log line ("request key=value ..."), in order."""
    records = []
    for line in log.splitlines():
        match = _REQUEST_LINE.search(line)
        if match:
            records.append(dict(_FIELD.findall(match["fields"])))
    return records


def wait_for_records(proxy: Proxy, count: int, timeout: float = 5.0) -> list[dict[str, str]]:
    """Wait until the proxy has logged at least C{count} request lines."""
    deadline = time.monotonic() + timeout
    while len(records := request_records(proxy.log_text())) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(records)} request lines logged, expected {count}:\n{proxy.log_text()}")
        time.sleep(0.05)
    return records


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample in a Prometheus text exposition, as (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def metric_value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of C{name}'s samples whose labels include C{labels} (0 when there are none)."""
    return sum(value for n, sample_labels, value in samples
               if n == name and all(sample_labels.get(k) == v for k, v in labels.items()))


@dataclass(frozen=True, kw_only=True, eq=False)
class Fed(Script):
    """An SSE stream whose events the test hands over one by one through C{feed}; None ends it."""

    feed: queue.Queue[bytes | None]

    def serve(self, conn: _Connection, exchange: Exchange) -> None:
        conn.send_head(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])
        while (event := self.feed.get(timeout=TIMEOUT)) is not None:
            conn.send_chunk(exchange, event)
            exchange.events_sent.append((time.monotonic(), event))
        conn.end_chunks()
        exchange.completed = True


def tcp_queues(local_port: int | None = None, remote_port: int | None = None) -> tuple[int, int]:
    """(send queue, receive queue) in bytes of the one established IPv4 TCP socket on
    127.0.0.1 with these ports, from /proc/net/tcp: what the kernel holds unacknowledged
    for the peer, and what it holds unread by the socket's owner."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state != "01" or not local.startswith("0100007F:") or not remote.startswith("0100007F:"):
            continue
        if local_port is not None and int(local.split(":")[1], 16) != local_port:
            continue
        if remote_port is not None and int(remote.split(":")[1], 16) != remote_port:
            continue
        tx, rx = fields[4].split(":")
        found.append((int(tx, 16), int(rx, 16)))
    assert len(found) == 1, f"{len(found)} sockets {local_port} -> {remote_port} in /proc/net/tcp"
    return found[0]


class NarrowTunnel(Tunnel):
    """A L{Tunnel} whose TCP connection to the proxy is kept small: a fixed receive
    buffer and a small MSS (which keeps the proxy's send buffer small too), so a
    client that stops reading fills the kernel's buffers after a few KiB."""

    def __init__(self, proxy: Proxy, rcvbuf: int = 4096, mss: int = 1024) -> None:
        super().__init__(proxy, rcvbuf, mss)
