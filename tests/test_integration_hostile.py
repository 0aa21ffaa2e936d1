"""Integration: upstreams that misbehave on purpose, against the real twistd proxy.

Decompression bombs, endless response heads, corrupt and truncated gzip: the
proxy must stay small and responsive, and nothing broken may reach a client
looking complete.
"""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import zlib
from typing import Any, Callable, Iterator

import httpx
import pytest

from egress_servers import Peer, TcpServer, blast, echo, mock_routes
from upstream import BASE, ByPath, Encoded, Stream, openai_chat_events, routes_config, tokens

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
EMBED = {"model": "m", "input": "x"}
HEAD_CAP = 48 * MiB  # an endless head upstream stops here if nobody cuts it (the unfixed proxy)


def gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=31)
    return compressor.compress(data) + compressor.flush()


def zeros_gzip(size: int) -> bytes:
    """A gzip body of C{size} zero bytes (about 1000:1)."""
    compressor = zlib.compressobj(9, wbits=31)
    block = bytes(MiB)
    return b"".join(compressor.compress(block) for _ in range(size // MiB)) + compressor.flush()


_JSON = gzip(json.dumps({"data": [[i / 7 for i in range(3000)]]}).encode())
HALF_JSON = _JSON[:len(_JSON) // 2]


def read_all(client: httpx.Client, path: str, body: Any) -> tuple[int | None, bytes, Exception | None]:
    """Status (None if no response arrived), body bytes received and the error that ended reading, if any."""
    received = b""
    try:
        with client.stream("POST", f"{BASE}{path}", json=body) as response:
            try:
                for chunk in response.iter_raw():
                    received += chunk
            except httpx.HTTPError as e:
                return response.status_code, received, e
    except httpx.RemoteProtocolError as e:  # aborted before the head was flushed
        return None, received, e
    return response.status_code, received, None


# --- decompression ---------------------------------------------------------------------


def test_upstream_is_asked_for_identity_only(upstream, http_client):
    upstream.script = Encoded(body=gzip(b'{"data": []}'))
    http_client.post(f"{BASE}/v1/embeddings", json=EMBED, headers={"accept-encoding": "gzip, br"})
    assert upstream.only().headers["accept-encoding"] == "identity"


def test_gzip_json_is_decoded_once_for_the_client(upstream, http_client):
    document = {"object": "list", "data": [{"embedding": [0.5] * 100}]}
    upstream.script = Encoded(body=gzip(json.dumps(document).encode()))
    response = http_client.post(f"{BASE}/v1/embeddings", json=EMBED)
    assert response.status_code == 200 and response.json() == document
    assert "content-encoding" not in response.headers


def test_double_gzip_is_refused_before_headers_and_the_proxy_stays_small(upstream, proxy, http_client):
    upstream.script = Encoded(body=gzip(zeros_gzip(256 * MiB)), encoding="gzip, gzip")
    before = proxy.rss_bytes()
    response = http_client.post(f"{BASE}/v1/embeddings", json=EMBED)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_error" and "Content-Encoding" in error["message"]
    assert proxy.rss_bytes() - before < 32 * MiB
    proxy.wait_for_log("outcome=upstream_error")


def test_bomb_is_cut_while_a_healthy_stream_keeps_flowing(upstream, proxy, make_client):
    parts = tokens(40)
    upstream.script = ByPath(
        paths={"/v1/embeddings": Encoded(body=zeros_gzip(512 * MiB), chunk=64 * 1024)},
        default=Stream(events=openai_chat_events(parts), interval=0.02),
    )
    before = proxy.rss_bytes()
    gaps: list[float] = []

    def healthy() -> None:
        with make_client().stream("POST", f"{BASE}/v1/chat/completions", json=CHAT) as response:
            last = time.monotonic()
            for _ in response.iter_raw():
                now = time.monotonic()
                gaps.append(now - last)
                last = now

    stream = threading.Thread(target=healthy)
    stream.start()
    time.sleep(0.2)  # the stream is under way
    status, received, error = read_all(make_client(), "/v1/embeddings", EMBED)
    stream.join(10)
    assert status in (200, None) and error is not None  # the chunked body was aborted: not complete
    assert len(received) <= 4 * MiB
    assert proxy.rss_bytes() - before < 48 * MiB
    assert len(gaps) > 10 and max(gaps[1:]) < 0.1, max(gaps[1:])
    log = proxy.wait_for_log("detail=upstream_decode_limit")
    assert "max_decompression_ratio" in log


@pytest.mark.parametrize(("script", "path"), [
    pytest.param(Encoded(body=b"\x1f\x8b\x08\x00" + b"not deflate at all" * 10), "/v1/embeddings", id="corrupt"),
    pytest.param(Encoded(body=HALF_JSON), "/v1/embeddings", id="json-cut-in-half"),  # content-length: the half
])
def test_undecodable_json_body_never_looks_complete(upstream, proxy, http_client, script, path):
    upstream.script = script
    status, received, error = read_all(http_client, path, EMBED)
    assert error is not None, received  # the client sees a truncated body, not a clean 200
    proxy.wait_for_log("detail=upstream_decode_error")


def test_gzip_stream_without_its_trailer_ends_with_an_error_event(upstream, proxy, http_client):
    compressor = zlib.compressobj(wbits=31)
    events = openai_chat_events(tokens(3))
    body = b"".join(compressor.compress(e) + compressor.flush(zlib.Z_SYNC_FLUSH) for e in events)
    upstream.script = Encoded(body=body, content_type="text/event-stream", chunk=64)  # framing complete, no trailer
    status, received, error = read_all(http_client, "/v1/chat/completions", CHAT)
    assert status == 200 and error is None
    last = received.strip().split(b"\n\n")[-1]
    assert b"response truncated" in last and b"gzip" in last
    proxy.wait_for_log("detail=upstream_decode_error")


# --- response heads ----------------------------------------------------------------------


def endless_head(obs_fold: bool) -> Callable[[socket.socket, Peer], None]:
    """Answers any request with a status line and header lines until the proxy hangs up (or HEAD_CAP)."""

    def handler(sock: socket.socket, peer: Peer) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            data = peer.recv(sock)
            if not data:
                return
            request += data
        peer.send(sock, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Start: a\r\n")
        line = b" " + b"f" * 98 + b"\r\n" if obs_fold else b"X-Filler: " + b"f" * 88 + b"\r\n"
        batch = line * 100
        while peer.sent < HEAD_CAP:
            peer.send(sock, batch)
        while peer.recv(sock):  # the proxy has it all: wait for it to give up
            pass

    return handler


@pytest.fixture(params=[False, True], ids=["header-lines", "obs-fold"])
def head_server(request: pytest.FixtureRequest) -> Iterator[TcpServer]:
    server = TcpServer(endless_head(request.param)).start()
    yield server
    server.stop()


def test_endless_response_head_on_an_inference_route_is_cut_with_502(start_proxy, head_server):
    proxy = start_proxy(routes_config(f"http://127.0.0.1:{head_server.port}"))
    before = proxy.rss_bytes()
    with httpx.Client(proxy=proxy.url, verify=ssl.create_default_context(cafile=str(proxy.ca_path)), timeout=10, trust_env=False) as client:
        response = client.post(f"{BASE}/v1/embeddings", json=EMBED)
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_error"
    assert "head" in response.json()["error"]["message"]
    assert head_server.last_peer().sent < 8 * MiB  # kernel buffers included  # cut as it arrived, not after a timeout
    assert proxy.rss_bytes() - before < 16 * MiB
    assert "upstream response head" in proxy.wait_for_log("upstream call failed")


def test_endless_response_head_on_the_forward_path_is_cut_with_502(start_proxy, head_server):
    proxy = start_proxy({**mock_routes(), "policy": {"allow": [f"127.0.0.1:{head_server.port}"]}})
    before = proxy.rss_bytes()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        target = f"http://127.0.0.1:{head_server.port}/"
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{head_server.port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502"), head
    assert json.loads(body)["error"] == "upstream_error" and "head" in json.loads(body)["detail"]
    assert head_server.last_peer().sent < 8 * MiB  # kernel buffers included
    assert proxy.rss_bytes() - before < 16 * MiB


# --- kernel buffers --------------------------------------------------------------------


def _skmem(port_filter: str) -> list[str]:
    """The skmem lines of established TCP sockets matching C{port_filter} (ss syntax)."""
    out = subprocess.run(["ss", "-tnm", "state", "established", port_filter], capture_output=True, text=True,
                         check=True).stdout
    return [line.strip() for line in out.splitlines() if "skmem" in line]


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_tunnel_sockets_have_bounded_kernel_buffers(start_proxy):
    server = TcpServer(echo).start()
    try:
        proxy = start_proxy({**mock_routes(), "policy": {"allow": [f"127.0.0.1:{server.port}"]},
                             "limits": {"socket_buffer_bytes": 50000}})
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            client_side = _skmem(f"( sport = :{proxy.port} )")
            upstream_side = _skmem(f"( dport = :{server.port} and sport != :{server.port} )")
        assert len(client_side) == 1 and len(upstream_side) == 1, (client_side, upstream_side)
        for line in client_side + upstream_side:
            assert ",rb100000," in line and ",tb100000," in line, line
    finally:
        server.stop()


def test_slow_but_steady_tunnel_reader_is_not_dropped(start_proxy):
    """write_stall 2 s; the client reads 32 KB/s for 8 s: always progressing, never stalled."""
    server = TcpServer(blast).start()
    try:
        proxy = start_proxy({**mock_routes(), "policy": {"allow": [f"127.0.0.1:{server.port}"]},
                             "timeouts": {"write_stall": 2}})
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", proxy.port))
            sock.sendall(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\nHost: x\r\n\r\nD {64 * MiB}\n".encode())
            received = len(sock.recv(4096))
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                data = sock.recv(4096)
                assert data, f"dropped after {received} bytes"
                received += len(data)
                time.sleep(4096 / 32768)
        assert "client_stalled" not in proxy.log_text()
    finally:
        server.stop()
