"""Integration: flow control, cancellation and timeouts between client, proxy and upstream.

A slow reader must slow the upstream down rather than fill the proxy's
memory; a client that leaves must make the proxy leave the upstream too.
"""
from __future__ import annotations

import ssl
import time
from typing import Any, Callable

import pytest

from upstream import BASE, ByPath, Firehose, Json, Script, Stream, openai_chat_events, routes_config, tokens

pytestmark = pytest.mark.integration

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
KiB = 1024
MiB = 1024 * KiB
NOTICE_WITHIN = 3.0  # seconds for the upstream to see the proxy hang up


def read_up_to(tunnel: Any, size: int) -> int:
    """Read C{size} bytes (fewer only at the end of the stream); returns how many."""
    got = 0
    while got < size:
        chunk = tunnel.recv(size - got)
        if not chunk:
            break
        got += len(chunk)
    return got


def test_slow_reader_pauses_the_upstream(upstream, proxy, open_tunnel):
    total = 200 * MiB
    upstream.script = Firehose(total=total)
    rss_before = proxy.rss_bytes()
    tunnel = open_tunnel(rcvbuf=64 * KiB)
    tunnel.request("POST", "/v1/chat/completions", CHAT)
    status, head = tunnel.read_head()
    assert status == 200, head
    exchange = upstream.only()

    received = max_ahead = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        received += read_up_to(tunnel, 64 * KiB)
        max_ahead = max(max_ahead, exchange.bytes_sent - received)
        time.sleep(0.02)
    rss_growth = proxy.rss_bytes() - rss_before
    print(f"\nbackpressure: client read {received / MiB:.1f} MiB, upstream sent {exchange.bytes_sent / MiB:.1f} MiB,"
          f" at most {max_ahead / MiB:.2f} MiB ahead; proxy RSS grew {rss_growth / MiB:.1f} MiB")

    assert received > 2 * MiB, "the stream hardly flowed"
    assert max_ahead < 16 * MiB
    assert not exchange.completed and exchange.bytes_sent < total / 4, "the upstream was not paused"
    assert rss_growth < 64 * MiB

    tunnel.close()
    exchange.wait(NOTICE_WITHIN)
    assert exchange.peer_closed_at is not None


def test_a_stalled_reader_does_not_hold_up_other_clients(upstream, proxy, open_tunnel, http_client):
    embeddings = {"object": "list", "data": []}
    upstream.script = ByPath(paths={"/v1/embeddings": Json(body=embeddings)}, default=Firehose(total=200 * MiB))
    stalled = open_tunnel(rcvbuf=64 * KiB)
    stalled.request("POST", "/v1/chat/completions", CHAT)
    assert stalled.read_head()[0] == 200
    firehose = upstream.only()
    time.sleep(0.3)  # let the buffers fill and the proxy pause the upstream

    start = time.monotonic()
    response = http_client.post(f"{BASE}/v1/embeddings", json={"input": "x"})

    assert response.json() == embeddings
    assert time.monotonic() - start < 1
    assert firehose.bytes_sent < 16 * MiB and not firehose.completed


def _read_two_events(tunnel: Any) -> None:
    status, head = tunnel.read_head()
    assert status == 200, head
    tunnel.read_until(lambda data: data.count(b"data: ") >= 2)


def _wait_half_a_second(tunnel: Any) -> None:
    time.sleep(0.5)


@pytest.mark.parametrize(("script", "before_leaving"), [
    pytest.param(Stream(events=openai_chat_events(tokens(50)), interval=0.1), _read_two_events, id="mid-stream"),
    pytest.param(Json(body={"late": True}, headers_delay=10), _wait_half_a_second, id="awaiting-headers"),
])
def test_client_leaving_cancels_the_upstream_call(upstream, http_client, open_tunnel, script: Script,
                                                  before_leaving: Callable[[Any], None]):
    upstream.script = script
    tunnel = open_tunnel()
    tunnel.request("POST", "/v1/chat/completions", CHAT)
    exchange = upstream.only()
    before_leaving(tunnel)

    tunnel.close()
    left = time.monotonic()
    exchange.wait(NOTICE_WITHIN + 1)

    assert exchange.peer_closed_at is not None, "the upstream finished: nobody cancelled it"
    assert exchange.peer_closed_at - left < NOTICE_WITHIN
    assert not exchange.completed
    assert len(exchange.events_sent) < 10

    # The proxy is still fine for the next client.
    upstream.script = Json(body={"object": "list", "data": []})
    assert http_client.post(f"{BASE}/v1/embeddings", json={"input": "x"}).status_code == 200


class TestWriteStall:
    """A proxy that gives up on a client which reads nothing for 1 s."""

    @pytest.fixture
    def proxy(self, start_proxy, upstream):
        return start_proxy({**routes_config(upstream.url), "timeouts": {"write_stall": 1}})

    def test_stalled_client_is_cut_off_and_the_upstream_released(self, upstream, open_tunnel):
        upstream.script = Firehose(total=200 * MiB)
        tunnel = open_tunnel(rcvbuf=64 * KiB)
        tunnel.request("POST", "/v1/chat/completions", CHAT)
        assert tunnel.read_head()[0] == 200
        start = time.monotonic()

        exchange = upstream.only()
        exchange.wait(1 + NOTICE_WITHIN)
        assert exchange.peer_closed_at is not None and not exchange.completed
        assert exchange.peer_closed_at - start > 0.9

        received = 0
        try:
            while chunk := tunnel.recv():
                received += len(chunk)
        except (ConnectionError, ssl.SSLError):  # the proxy aborted: a reset, maybe as TLS reports it
            pass
        assert received < 32 * MiB, "the proxy kept the stalled connection"

    def test_steady_slow_reader_inside_intercepted_tls_is_kept(self, upstream, open_tunnel):
        # 40 KB/s: the proxy's kernel send buffer (2 x 256 KiB) takes seconds to drain
        # far enough to accept more, so its write buffer stays full for many write_stalls.
        upstream.script = Firehose(total=200 * MiB)
        tunnel = open_tunnel(rcvbuf=16 * KiB)
        tunnel.request("POST", "/v1/chat/completions", CHAT)
        assert tunnel.read_head()[0] == 200
        received = 0
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            try:
                chunk = tunnel.recv(4 * KiB)
            except (ConnectionError, ssl.SSLError):  # aborted
                chunk = b""
            assert chunk, f"the proxy dropped a client that read {received} bytes at 40 KB/s"
            received += len(chunk)
            time.sleep(0.1)
        assert not upstream.only().peer_closed_at

