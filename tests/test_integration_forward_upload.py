"""Integration: a large plain C{http://} upload streams through the forward path.

The origin on 127.0.0.1 reads the body slowly; the proxy must read the client
only as fast as the origin takes the bytes (its RSS stays flat), pass the
body intact with the framing the client chose (a declared length, or
chunks), and not cap it at C{limits.max_body_bytes} (it never holds it).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any, Iterator

import pytest

from egress_servers import TIMEOUT, Conn, KiB, LoopbackHttpServer, MiB, QuietHandler, ServerThread, mock_routes

pytestmark = pytest.mark.integration

READ, PAUSE = 256 * KiB, 0.005  # the origin's pace: at most ~50 MiB/s
CHUNK = 64 * KiB


class _SlowSink(QuietHandler):
    """Reads the request body READ bytes every PAUSE s (by length or chunked); answers its size and hash."""

    def do_POST(self) -> None:
        digest, received = hashlib.sha256(), 0
        for piece in self._pieces():
            digest.update(piece)
            if (received + len(piece)) // READ > received // READ:
                time.sleep(PAUSE)
            received += len(piece)
        payload = json.dumps({"received": received, "sha256": digest.hexdigest(),
                              "content-length": self.headers.get("content-length"),
                              "transfer-encoding": self.headers.get("transfer-encoding")}).encode()
        self.answer(200, [("content-type", "application/json")], payload)

    def _pieces(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                yield from self._read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
        else:
            yield from self._read(int(self.headers.get("content-length") or 0))

    def _read(self, size: int) -> Iterator[bytes]:
        while size:
            piece = self.rfile.read(min(size, READ))
            assert piece, "the proxy ended the body early"
            size -= len(piece)
            yield piece


@pytest.fixture(scope="module")
def sink() -> Iterator[int]:
    running = ServerThread(LoopbackHttpServer(("127.0.0.1", 0), _SlowSink)).start()
    yield running.port
    running.stop()


@pytest.fixture
def proxy(start_proxy, sink: int):  # type: ignore[no-untyped-def]
    """One per test: memory a previous upload left in the heap would hide this one's growth."""
    return start_proxy({**mock_routes(), "policy": {"allow": [f"127.0.0.1:{sink}"]}})


def _upload(proxy: Any, port: int, total: int, chunked: bool) -> tuple[dict, str, int]:
    """POST C{total} bytes through the proxy; the origin's answer, the sent hash, and the proxy's peak RSS."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    head = f"POST http://127.0.0.1:{port}/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{framing}\r\n\r\n"
    pattern = bytes(range(256)) * ((CHUNK - 8) // 256) + bytes((CHUNK - 8) % 256)
    sent = hashlib.sha256()
    peak = proxy.rss_bytes()
    errors: list[BaseException] = []
    done = threading.Event()
    with Conn.open(proxy.port) as conn:

        def send() -> None:
            try:
                conn.send(head.encode())
                for i in range(total // CHUNK):
                    chunk = i.to_bytes(8, "big") + pattern  # numbered: a reordered or repeated chunk changes the hash
                    sent.update(chunk)
                    conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    conn.send(b"0\r\n\r\n")
            except BaseException as e:  # reported by the test thread
                errors.append(e)
            finally:
                done.set()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while not done.wait(0.02):
            peak = max(peak, proxy.rss_bytes())
        peak = max(peak, proxy.rss_bytes())  # all sent: a proxy that held the body holds most of it now
        sender.join(TIMEOUT)
        assert not errors, errors
        response = conn.response()
    assert response.status == 200, response
    return response.json(), sent.hexdigest(), peak


@pytest.mark.parametrize(("total", "chunked"), [
    pytest.param(256 * MiB, False, id="256-mib-declared-length"),
    pytest.param(128 * MiB, True, id="128-mib-chunked"),
])
def test_large_upload_streams_at_the_origins_pace_with_flat_proxy_memory(proxy, sink, total, chunked):
    _upload(proxy, sink, 4 * MiB, chunked)  # warm-up: the connection pool, the first request's allocations
    baseline = proxy.rss_bytes()
    start = time.monotonic()

    answer, sent_hash, peak = _upload(proxy, sink, total, chunked)

    growth = peak - baseline
    print(f"\n{total // MiB} MiB {'chunked' if chunked else 'with a declared length'} through the forward path:"
          f" {time.monotonic() - start:.1f} s; proxy RSS grew {growth / MiB:.1f} MiB (from {baseline / MiB:.1f} MiB)")
    assert answer["received"] == total and answer["sha256"] == sent_hash, "the body was corrupted"
    if chunked:  # the Agent's own chunked framing, no length
        assert (answer["transfer-encoding"], answer["content-length"]) == ("chunked", None)
    else:  # the declared length, sent once
        assert (answer["transfer-encoding"], answer["content-length"]) == (None, str(total))
    assert growth < 24 * MiB
