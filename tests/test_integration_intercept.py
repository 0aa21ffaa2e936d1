"""Intercepting a listed host: real twistd, real clients, a local HTTPS origin with its own CA.

The origin is reached by IP literal (127.0.0.1), trusted through the entry's
C{upstream_ca}; clients trust only navtwist's CA.
"""
from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from conftest import TIMEOUT, Proxy, ProxyStarter
from egress_servers import Conn, HttpServer, ServerCert, make_server_cert, tls_origin

pytestmark = pytest.mark.integration

MOCK_ROUTES = [{"name": "inference.local", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}]


@pytest.fixture
def origin_cert(tmp_path: Path) -> ServerCert:
    return make_server_cert(tmp_path)


@pytest.fixture
def origin(origin_cert: ServerCert) -> Iterator[HttpServer]:
    server = HttpServer(origin_cert.server_context()).start()
    yield server
    server.stop()


def _entry(port: int, cert: ServerCert, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "upstream_ca": str(cert.cert_path), **extra}


def _rules_entry(port: int, cert: ServerCert, **extra: Any) -> dict[str, Any]:
    return _entry(
        port, cert, access="read-only", deny_reason="ask the operator",
        rules=[{"deny": {"method": "*", "path": "/secret/**"}},
               {"allow": {"method": ["POST"], "path": "/repos/acme/*/git-upload-pack"}}],
        **extra,
    )


def _start(start_proxy: ProxyStarter, entries: list[dict[str, Any]]) -> Proxy:
    return start_proxy({"routes": MOCK_ROUTES, "policy": {"intercept": entries}})


def _curl(proxy: Proxy, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(TIMEOUT), "-x", proxy.url, "--cacert", str(proxy.ca_path),
         "-w", "\n%{http_code}", *args, url],
        capture_output=True, text=True, timeout=TIMEOUT + 5,
    )


def _decisions(proxy: Proxy) -> list[str]:
    return [line for line in proxy.log_text().splitlines() if "decision " in line]


def test_curl_get_is_allowed_and_reaches_the_origin_with_its_own_host(
    start_proxy: ProxyStarter, origin: HttpServer, origin_cert: ServerCert
) -> None:
    proxy = _start(start_proxy, [_rules_entry(origin.port, origin_cert)])
    result = _curl(proxy, f"https://127.0.0.1:{origin.port}/repos/acme/x?token=s3cret")
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "200", result
    assert json.loads(body)["path"] == "/repos/acme/x?token=s3cret"
    [seen] = origin.seen
    assert seen.header("host") == [f"127.0.0.1:{origin.port}"]
    assert not seen.header("proxy-authorization")
    log = proxy.wait_for_log("decision allow request")
    assert "s3cret" not in log and "token=REDACTED" in log


def test_denied_request_gets_the_agent_readable_403_and_never_reaches_the_origin(
    start_proxy: ProxyStarter, origin: HttpServer, origin_cert: ServerCert
) -> None:
    proxy = _start(start_proxy, [_rules_entry(origin.port, origin_cert)])
    result = _curl(proxy, f"https://127.0.0.1:{origin.port}/gists", "-X", "POST", "-d", "x=1", "-D", "-")
    head_and_body, status = result.stdout.rsplit("\n", 1)
    assert status == "403", result
    assert "x-navtwist-error: l7_denied" in head_and_body.lower()
    document = json.loads(head_and_body.rsplit("\n\n", 1)[1])
    assert document == {"error": "l7_denied", "detail": "POST 127.0.0.1/gists not permitted by policy",
                        "reason": "ask the operator"}
    denied = _curl(proxy, f"https://127.0.0.1:{origin.port}/secret/a/b")
    assert denied.stdout.rsplit("\n", 1)[1] == "403"
    assert origin.seen == []
    proxy.wait_for_log("decision deny request")


def test_connection_stays_usable_after_a_denial(
    start_proxy: ProxyStarter, origin: HttpServer, origin_cert: ServerCert
) -> None:
    proxy = _start(start_proxy, [_rules_entry(origin.port, origin_cert)])
    context = ssl.create_default_context(cafile=str(proxy.ca_path))
    with Conn.open(proxy.port) as conn:
        conn.send(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
        assert conn.response(bodyless=True).status == 200
        conn.start_tls(context, "127.0.0.1")
        host = f"Host: 127.0.0.1:{origin.port}\r\n".encode()
        conn.send(b"POST /gists HTTP/1.1\r\n" + host + b"Content-Length: 5\r\n\r\nhello")
        assert conn.response().status == 403
        conn.send(b"GET /ok HTTP/1.1\r\n" + host + b"\r\n")
        second = conn.response()
        assert second.status == 200 and second.json()["path"] == "/ok"
    assert [seen.path for seen in origin.seen] == ["/ok"]


def test_audit_mode_lets_a_would_be_denial_through_and_logs_it(
    start_proxy: ProxyStarter, origin: HttpServer, origin_cert: ServerCert
) -> None:
    proxy = _start(start_proxy, [_rules_entry(origin.port, origin_cert, mode="audit")])
    result = _curl(proxy, f"https://127.0.0.1:{origin.port}/gists", "-X", "POST", "-d", "x=1")
    assert result.stdout.rsplit("\n", 1)[1] == "200", result
    assert [seen.path for seen in origin.seen] == ["/gists"]
    proxy.wait_for_log("decision would_deny request")


def test_requests_library_through_an_intercepted_host(
    start_proxy: ProxyStarter, origin: HttpServer, origin_cert: ServerCert
) -> None:
    proxy = _start(start_proxy, [_rules_entry(origin.port, origin_cert)])
    with requests.Session() as session:
        session.proxies = {"https": proxy.url}
        session.verify = str(proxy.ca_path)
        session.trust_env = False  # REQUESTS_CA_BUNDLE would replace session.verify
        url = f"https://127.0.0.1:{origin.port}"
        ok = session.post(f"{url}/repos/acme/widget/git-upload-pack", data=b"want", timeout=TIMEOUT)
        assert ok.status_code == 200 and ok.json()["body"] == "want"
        denied = session.delete(f"{url}/repos/acme/widget", timeout=TIMEOUT)
        assert denied.status_code == 403 and denied.headers["x-navtwist-error"] == "l7_denied"
        assert session.get(f"{url}/stream", timeout=TIMEOUT).text == "".join(f"part-{i}\n" for i in range(5))


def test_origin_with_an_untrusted_certificate_is_refused(
    start_proxy: ProxyStarter, origin: HttpServer, tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    other = make_server_cert(tmp_path / "other")
    proxy = _start(start_proxy, [_entry(origin.port, other, access="full")])
    result = _curl(proxy, f"https://127.0.0.1:{origin.port}/x")
    assert result.stdout.rsplit("\n", 1)[1] == "502", result
    assert origin.seen == []


def test_entry_without_rules_or_preset_denies_everything(
    start_proxy: ProxyStarter, origin: HttpServer, origin_cert: ServerCert
) -> None:
    proxy = _start(start_proxy, [_entry(origin.port, origin_cert)])
    assert _curl(proxy, f"https://127.0.0.1:{origin.port}/x").stdout.rsplit("\n", 1)[1] == "403"
    assert origin.seen == []


class _Counting(BaseHTTPRequestHandler):
    """Reads a request body at about RATE bytes/s without keeping it, and answers with its size.

    Slower than a client can send: without backpressure the proxy would hold the difference.
    """

    RATE = 96 << 20

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:
        size = 0
        if "chunked" in self.headers.get("transfer-encoding", ""):
            while chunk := int(self.rfile.readline().split(b";")[0], 16):
                size += len(self.rfile.read(chunk))
                self.rfile.readline()
                time.sleep(chunk / self.RATE)
            self.rfile.readline()
        else:
            remaining = int(self.headers.get("content-length", "0"))
            while remaining:
                got = len(self.rfile.read(min(remaining, 1 << 20)))
                assert got
                size += got
                remaining -= got
        payload = json.dumps({"received": size}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_a_gibibyte_upload_streams_with_flat_proxy_memory(
    start_proxy: ProxyStarter, origin_cert: ServerCert
) -> None:
    with tls_origin(_Counting, origin_cert) as port:
        proxy = _start(start_proxy, [_entry(port, origin_cert, access="read-write")])
        size = 1 << 30
        block = b"x" * (1 << 20)
        before = proxy.rss_bytes()
        peak = [before]

        def body() -> Iterator[bytes]:
            for i in range(size // len(block)):
                if i % 16 == 0:
                    peak[0] = max(peak[0], proxy.rss_bytes())
                yield block

        response = requests.post(
            f"https://127.0.0.1:{port}/upload", data=body(), proxies={"https": proxy.url},
            verify=str(proxy.ca_path), timeout=120,  # a generator: sent chunked
        )
        assert response.status_code == 200 and response.json() == {"received": size}, response.text[:300]
        assert peak[0] - before < 24 * 1024 * 1024, f"proxy RSS grew {(peak[0] - before) >> 20} MiB"


def test_reload_applies_new_rules_to_new_requests_on_an_open_connection(
    start_proxy: ProxyStarter, origin: HttpServer, origin_cert: ServerCert
) -> None:
    proxy = _start(start_proxy, [_entry(origin.port, origin_cert, access="read-only")])
    context = ssl.create_default_context(cafile=str(proxy.ca_path))
    host = f"Host: 127.0.0.1:{origin.port}\r\n".encode()
    with Conn.open(proxy.port) as conn:
        conn.send(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
        assert conn.response(bodyless=True).status == 200
        conn.start_tls(context, "127.0.0.1")
        conn.send(b"GET /before HTTP/1.1\r\n" + host + b"\r\n")
        assert conn.response().status == 200
        proxy.write_config({"routes": MOCK_ROUTES, "policy": {"intercept": [
            _entry(origin.port, origin_cert, rules=[{"allow": {"method": "GET", "path": "/after"}}])]}})
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for_log("config reloaded")
        conn.send(b"GET /before HTTP/1.1\r\n" + host + b"\r\n")
        assert conn.response().status == 403
        conn.send(b"GET /after HTTP/1.1\r\n" + host + b"\r\n")
        assert conn.response().status == 200
    assert [seen.path for seen in origin.seen] == ["/before", "/after"]


class _Upgrading(BaseHTTPRequestHandler):
    """Answers an upgrade with 101, then echoes raw bytes (what the proxy splices needs no framing)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        if self.headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in self.headers.get("connection", "").lower():
            self.send_response(400)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("X-Seen-Path", self.path)
        self.end_headers()
        self.wfile.flush()
        while data := self.connection.recv(65536):
            self.connection.sendall(data.upper())


def test_websocket_upgrade_is_judged_then_spliced(start_proxy: ProxyStarter, origin_cert: ServerCert) -> None:
    with tls_origin(_Upgrading, origin_cert) as port:
        proxy = _start(start_proxy, [_entry(port, origin_cert, rules=[{"allow": {"method": "GET", "path": "/ws/*"}}])])
        context = ssl.create_default_context(cafile=str(proxy.ca_path))
        upgrade = (f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        with Conn.open(proxy.port) as conn:
            conn.send(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert conn.response(bodyless=True).status == 200
            conn.start_tls(context, "127.0.0.1")
            conn.send(b"GET /admin HTTP/1.1\r\n" + upgrade)
            assert conn.response().status == 403  # the rules judge the upgrade request
            conn.send(b"GET /ws/chat HTTP/1.1\r\n" + upgrade)
            head = conn.read_until(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ") and b"X-Seen-Path: /ws/chat" in head
            for message in (b"hello", b"x" * 100_000):
                conn.send(message)
                assert conn.read_exact(len(message)) == message.upper()
        proxy.wait_for_log("decision allow request")


def test_an_origin_that_does_not_switch_protocols_is_a_502(
    start_proxy: ProxyStarter, origin: HttpServer, origin_cert: ServerCert
) -> None:
    proxy = _start(start_proxy, [_entry(origin.port, origin_cert, access="read-only")])
    result = _curl(proxy, f"https://127.0.0.1:{origin.port}/ws", "-H", "Upgrade: websocket", "-H", "Connection: Upgrade")
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "502" and json.loads(body)["error"] == "upgrade_refused", result


class _Serving(BaseHTTPRequestHandler):
    """Serves SIZE bytes as fast as it can write them."""

    protocol_version = "HTTP/1.1"
    SIZE = 256 << 20

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", str(self.SIZE))
        self.end_headers()
        block = b"y" * (1 << 20)
        try:
            for _ in range(self.SIZE // len(block)):
                self.wfile.write(block)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass


def test_a_slow_reader_of_an_intercepted_download_keeps_proxy_memory_flat(
    start_proxy: ProxyStarter, origin_cert: ServerCert
) -> None:
    with tls_origin(_Serving, origin_cert) as port:
        proxy = _start(start_proxy, [_entry(port, origin_cert, access="read-only")])
        context = ssl.create_default_context(cafile=str(proxy.ca_path))
        before = proxy.rss_bytes()
        peak = before
        with Conn.open(proxy.port, rcvbuf=65536) as conn:
            conn.send(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert conn.response(bodyless=True).status == 200
            conn.start_tls(context, "127.0.0.1")
            conn.send(f"GET /big HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert conn.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 200 ")
            received = 0
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:  # 64 KiB every 20 ms: about 3 MiB/s
                received += len(conn.read_exact(65536))
                time.sleep(0.02)
                peak = max(peak, proxy.rss_bytes())
        # The origin would send 256 MiB at once: the proxy must have paused it, not kept it.
        assert received >= 4 << 20
        assert peak - before < 24 << 20, f"proxy RSS grew {(peak - before) >> 20} MiB while a reader took {received >> 20} MiB"
