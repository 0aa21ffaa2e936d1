"""Integration: the non-inference egress, CONNECT tunnels and plain http:// forwarding.

One real twistd proxy serves the whole module, with a policy naming the
loopback servers of L{egress_servers} literally (and some by the name
localhost, which the SSRF guard must refuse).  Tunnels must be transparent
(end-to-end TLS, half-close, tens of MiB intact under backpressure with
bounded proxy memory); forwarding must pass requests on cleanly and stream
responses; every refusal is the proxy's JSON and nothing refused reaches a
server.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from egress_servers import (
    BANNER,
    STREAM_INTERVAL,
    STREAM_PARTS,
    TIMEOUT,
    Conn,
    HttpServer,
    KiB,
    MiB,
    ServerCert,
    TcpServer,
    assert_proxy_refusal,
    banner,
    connect,
    echo,
    ipv6_loopback,
    make_server_cert,
    mock_routes,
    refusing_port,
)

pytestmark = pytest.mark.integration

CURL = shutil.which("curl")
LOCALHOST = {info[4][0] for info in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)}
CONNECT_TIMEOUT = 2  # timeouts.connect: bounds resolving and dialling


@dataclass
class Servers:
    cert: ServerCert
    echo: TcpServer
    tls_echo: TcpServer
    banner: TcpServer
    unlisted: TcpServer  # listening, but in no policy entry
    named: TcpServer  # listed only as localhost:port, so the SSRF guard must refuse it
    web: HttpServer
    tls_web: HttpServer
    named_web: HttpServer  # listed only as localhost:port
    echo6: TcpServer | None  # on ::1, when the machine has IPv6 loopback
    closed: int  # listed, but nothing listens there

    def ports(self) -> dict[str, int | None]:
        return {"echo": self.echo.port, "tls_echo": self.tls_echo.port, "banner": self.banner.port,
                "unlisted": self.unlisted.port, "named": self.named.port,
                "web": self.web.port, "tls_web": self.tls_web.port, "named_web": self.named_web.port,
                "echo6": self.echo6 and self.echo6.port, "closed": self.closed}

    def accepted(self) -> int:
        """Connections accepted by all the TCP servers so far."""
        tcp = [self.echo, self.tls_echo, self.banner, self.unlisted, self.named, self.echo6]
        return sum(server.accepted for server in tcp if server is not None)

    def requests(self) -> int:
        """Requests received by both HTTP servers so far."""
        return sum(len(server.seen) for server in (self.web, self.tls_web, self.named_web))


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    cert = make_server_cert(tmp_path_factory.mktemp("server-cert"))
    with contextlib.ExitStack() as stack:
        def started(server):  # type: ignore[no-untyped-def]
            stack.callback(server.stop)
            return server.start()

        closed = stack.enter_context(refusing_port())
        yield Servers(
            cert=cert,
            echo=started(TcpServer(echo)),
            tls_echo=started(TcpServer(echo, tls=cert.server_context())),
            banner=started(TcpServer(banner)),
            unlisted=started(TcpServer(echo)),
            named=started(TcpServer(echo)),
            web=started(HttpServer()),
            tls_web=started(HttpServer(tls=cert.server_context())),
            named_web=started(HttpServer()),
            echo6=started(TcpServer(echo, host="::1")) if ipv6_loopback() else None,
            closed=closed.getsockname()[1],
        )


@pytest.fixture(scope="module")
def proxy(start_module_proxy, servers: Servers):  # type: ignore[no-untyped-def]
    listed = [servers.echo, servers.tls_echo, servers.banner, servers.web, servers.tls_web]
    allow = [f"127.0.0.1:{server.port}" for server in listed] + [
        f"127.0.0.1:{servers.closed}",
        f"localhost:{servers.named.port}",
        f"localhost:{servers.named_web.port}",
        f"localhost:{servers.echo.port}",  # 127.0.0.1:echo is listed too: that exempts the loopback answer
        "*.example.test:443",
    ]
    if servers.echo6 is not None:
        allow.append(f"[::1]:{servers.echo6.port}")
    return start_module_proxy({**mock_routes(), "policy": {"allow": allow}, "timeouts": {"connect": CONNECT_TIMEOUT}})


def tunnel(proxy, servers: Servers, target: str, **kwargs) -> Conn:  # type: ignore[no-untyped-def]
    """An open tunnel to C{target} (a template over L{Servers.ports})."""
    response, conn = connect(proxy.port, target.format(**servers.ports()), **kwargs)
    assert response.status == 200, response
    return conn


def curl(*args: str) -> dict:
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    result = subprocess.run([CURL, "-sS", "--max-time", "10", *args], capture_output=True, timeout=15, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- CONNECT: allowed destinations ---------------------------------------------------------


def test_tls_through_the_tunnel_is_end_to_end(proxy, servers):
    conn = tunnel(proxy, servers, "127.0.0.1:{tls_echo}")
    with conn:
        tls = conn.start_tls(servers.cert.client_context(), "127.0.0.1")

        assert tls.getpeercert(binary_form=True) == servers.cert.der, "the proxy intercepted the TLS"
        for message in (b"first", b"second " * 1000, b"third"):
            tls.sendall(message)
            assert conn.read_exact(len(message)) == message


@pytest.mark.parametrize(("target", "early"), [
    pytest.param("127.0.0.1:{echo}", b"", id="ip-literal"),
    pytest.param("127.0.0.1:{echo}", b"sent together with the CONNECT head", id="early-data"),
    pytest.param("localhost:{echo}", b"", id="name-resolving-to-a-listed-ip"),
    pytest.param("[::1]:{echo6}", b"", id="ipv6-literal"),
    # 127.0.0.1:{echo} is listed, and an IPv4 address and its ::ffff: form are one address
    pytest.param("[::ffff:127.0.0.1]:{echo}", b"", id="ipv4-mapped-form-of-a-listed-ip"),
])
def test_allowed_destination_tunnels_bytes(proxy, servers, target, early):
    if ("echo6" in target or "::ffff:" in target) and servers.echo6 is None:
        pytest.skip("no IPv6 loopback on this machine")
    if target.startswith("localhost") and LOCALHOST != {"127.0.0.1"}:
        pytest.skip(f"localhost resolves to {LOCALHOST} here, not only to the listed 127.0.0.1")
    response, conn = connect(proxy.port, target.format(**servers.ports()), early)
    with conn:
        assert response.status == 200, response
        conn.send(b"ping")
        assert conn.read_exact(len(early) + 4) == early + b"ping"


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("scheme", ["https", "http"])
def test_curl_through_the_tunnel(proxy, servers, scheme):
    server = servers.tls_web if scheme == "https" else servers.web
    url = f"{scheme}://127.0.0.1:{server.port}/tunnelled?x=1"
    before = len(server.seen)

    out = curl("--proxytunnel", "-x", f"http://127.0.0.1:{proxy.port}", "--cacert", str(servers.cert.cert_path), url)

    assert out == {"method": "GET", "path": "/tunnelled?x=1", "body": ""}
    (seen,) = server.seen[before:]
    assert seen.header("host") == [f"127.0.0.1:{server.port}"]


# --- CONNECT: refusals ---------------------------------------------------------------------


def _denied(target: str, detail: str | None = None):  # type: ignore[no-untyped-def]
    return pytest.param(target, 403, "policy_denied", f"CONNECT {detail or target} not permitted by policy",
                        id=f"denied-{target}")


@pytest.mark.parametrize(("target", "status", "error", "detail"), [
    _denied("127.0.0.1:{unlisted}"),
    _denied("127.0.0.2:{echo}"),
    _denied("localhost:{unlisted}"),
    _denied("example.test:443"),  # a wildcard never covers its bare suffix
    _denied("a.example.test:444"),
    _denied("a.example.test.evil:443"),
    _denied("aexample.test:443"),
    _denied("10.0.0.1:443"),  # IP literals pass only when listed, internal or not
    _denied("169.254.169.254:80"),
    _denied("[::ffff:127.0.0.1]:{unlisted}", "::ffff:127.0.0.1:{unlisted}"),
    pytest.param("localhost:{named}", 403, "ssrf_denied", "localhost resolves to a loopback address", id="ssrf-name"),
    pytest.param("LocalHost.:{named}", 403, "ssrf_denied", "localhost resolves to a loopback address",
                 id="ssrf-name-case-dot"),
    *(pytest.param(f"{host}:{{echo}}", 400, "bad_request", "ambiguous IP address form", id=f"lenient-ip-{host}")
      for host in ("127.1", "0x7f.0.0.1", "2130706433", "0177.0.0.1")),
    pytest.param("127.0.0.1:{closed}", 502, "upstream_unreachable", "cannot connect to the destination",
                 id="listed-port-closed"),
])
def test_connect_refused(proxy, servers, target, status, error, detail):
    accepted = servers.accepted()

    response, conn = connect(proxy.port, target.format(**servers.ports()))

    with conn:
        assert_proxy_refusal(response, status, error, detail.format(**servers.ports()))
        assert response.headers["connection"] == "close"
        assert conn.closed()
    assert servers.accepted() == accepted, "a refused CONNECT reached a server"


@pytest.mark.skipif(os.environ.get("NAVTWIST_TEST_DNS") != "1", reason="resolving nope.example.test queries the"
                    " system resolver, which is off loopback; NAVTWIST_TEST_DNS=1 runs it")
def test_connect_to_allowed_name_that_does_not_resolve(proxy):
    start = time.monotonic()
    response, conn = connect(proxy.port, "nope.example.test:443")

    with conn:
        # .test never resolves; a resolver that does not answer runs into timeouts.connect.
        if response.status == 504:
            assert_proxy_refusal(response, 504, "upstream_timeout", "resolving nope.example.test timed out")
        else:
            assert_proxy_refusal(response, 502, "upstream_unreachable", "cannot resolve nope.example.test")
        assert conn.closed()
    assert time.monotonic() - start < CONNECT_TIMEOUT + 1


# --- CONNECT: half-close, integrity, memory, throughput ---------------------------------


def _client_closes_first(conn: Conn, servers: Servers) -> None:
    payload = b"half-close " * 5000
    conn.send(payload)
    conn.sock.shutdown(socket.SHUT_WR)

    assert conn.read_to_eof() == payload  # all echoed, then the upstream's FIN, sent once it saw ours
    peer = servers.echo.last_peer()
    assert peer.eof.is_set() and peer.received == len(payload)


def _upstream_closes_first(conn: Conn, servers: Servers) -> None:
    assert conn.read_to_eof() == BANNER  # the upstream's FIN reached us while our side stays open

    conn.send(b"still talking after your FIN")
    conn.sock.shutdown(socket.SHUT_WR)

    peer = servers.banner.last_peer()
    assert bytes(peer.data) == b"still talking after your FIN" and peer.eof.is_set()


@pytest.mark.parametrize(("server", "scenario"), [
    pytest.param("echo", _client_closes_first, id="client-first"),
    pytest.param("banner", _upstream_closes_first, id="upstream-first"),
])
def test_half_close_passes_through(proxy, servers, server, scenario):
    with tunnel(proxy, servers, f"127.0.0.1:{{{server}}}") as conn:
        scenario(conn, servers)


def test_fin_right_behind_the_connect_head_is_passed_on(proxy, servers):
    target = f"127.0.0.1:{servers.echo.port}"
    with Conn.open(proxy.port) as conn:
        conn.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nearly, then FIN".encode())
        conn.sock.shutdown(socket.SHUT_WR)  # before the proxy has answered, let alone dialled

        assert conn.response(bodyless=True).status == 200
        assert conn.read_to_eof() == b"early, then FIN"
    assert servers.echo.last_peer().eof.is_set()


def test_64_mib_each_way_intact_with_bounded_proxy_memory(proxy, servers):
    chunk_size, total = 64 * KiB, 64 * MiB
    pattern = os.urandom(chunk_size - 8)
    baseline = peak = proxy.rss_bytes()
    conn = tunnel(proxy, servers, "127.0.0.1:{echo}", rcvbuf=32 * KiB)
    sock = conn.sock
    sent_hash, received_hash = hashlib.sha256(), hashlib.sha256()
    errors: list[BaseException] = []
    done = threading.Event()

    def send() -> None:
        try:
            for i in range(total // chunk_size):
                chunk = i.to_bytes(8, "big") + pattern  # numbered: a reordered or repeated chunk changes the hash
                sent_hash.update(chunk)
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, proxy.rss_bytes())

    threads = [threading.Thread(target=send, daemon=True), threading.Thread(target=sample, daemon=True)]
    for thread in threads:
        thread.start()
    start = time.monotonic()
    received = 0
    try:
        while received < total:  # a slow reader: 64 KiB every 5 ms
            want = min(64 * KiB, total - received)
            while want:
                data = sock.recv(want)
                assert data, f"tunnel closed after {received} bytes"
                received_hash.update(data)
                received += len(data)
                want -= len(data)
            time.sleep(0.005)
        assert conn.closed()
    finally:
        done.set()
        conn.close()
        for thread in threads:
            thread.join(TIMEOUT)
    elapsed = time.monotonic() - start
    growth = peak - baseline
    print(f"\n64 MiB each way through a tunnel, slow reader: {elapsed:.1f} s;"
          f" proxy RSS grew {growth / MiB:.1f} MiB (from {baseline / MiB:.1f} MiB)")

    assert not errors, errors
    peer = servers.echo.last_peer()
    assert peer.received == total and peer.received_hash.digest() == sent_hash.digest(), "client → server corrupted"
    assert received_hash.digest() == peer.sent_hash.digest() == sent_hash.digest(), "server → client corrupted"
    assert growth < 32 * MiB


# --- plain http:// forwarding ----------------------------------------------------------


def http_request(method: str, url: str, host: str, headers: str = "", body: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {url} HTTP/1.1\r\nHost: {host}\r\n{headers}{length}\r\n".encode() + body


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_forwards_http(proxy, servers):
    url = f"http://127.0.0.1:{servers.web.port}/path?q=1"
    before = len(servers.web.seen)

    out = curl("-x", f"http://127.0.0.1:{proxy.port}", "-U", "agent:secret", "-H", "Proxy-Connection: keep-alive", url)

    assert out == {"method": "GET", "path": "/path?q=1", "body": ""}
    (seen,) = servers.web.seen[before:]
    assert seen.path == "/path?q=1"
    assert seen.header("host") == [f"127.0.0.1:{servers.web.port}"]
    assert seen.header("proxy-authorization") == [] and seen.header("proxy-connection") == []


def test_forwarding_keeps_the_connection_alive_and_drops_hop_headers(proxy, servers):
    web = servers.web.port
    base = f"http://127.0.0.1:{web}"
    before = len(servers.web.seen)
    hop = "Proxy-Authorization: Basic YWdlbnQ6c2VjcmV0\r\nProxy-Connection: keep-alive\r\n" \
          "Connection: keep-alive, X-Hop\r\nX-Hop: dropped\r\nX-Kept: kept\r\nX_Under: dropped\r\n"

    with Conn.open(proxy.port) as conn:
        conn.send(http_request("GET", f"{base}/one?a=1", "evil.example", hop))
        first = conn.response()
        conn.send(http_request("POST", f"{base}/two", f"127.0.0.1:{web}", body=b"a body"))
        second = conn.response()

    assert (first.status, first.json()) == (200, {"method": "GET", "path": "/one?a=1", "body": ""})
    assert (second.status, second.json()) == (200, {"method": "POST", "path": "/two", "body": "a body"})
    one, two = servers.web.seen[before:]
    assert one.header("host") == two.header("host") == [f"127.0.0.1:{web}"]  # from the URI, never the client's
    assert one.header("x-kept") == ["kept"]
    assert two.header("content-length") == ["6"], "the body's length must be sent exactly once"
    for name in ("proxy-authorization", "proxy-connection", "x-hop", "x_under"):
        assert one.header(name) == [], name


def test_forwarded_chunked_response_streams(proxy, servers):
    markers = [b"part-%d\n" % i for i in range(STREAM_PARTS)]

    with Conn.open(proxy.port, trace=True) as conn:
        conn.send(http_request("GET", f"http://127.0.0.1:{servers.web.port}/stream", "x"))
        response = conn.response()

    assert response.status == 200 and response.body == b"".join(markers)
    received = b""
    arrived: dict[bytes, float] = {}
    for at, data in conn.trace:
        received += data
        arrived.update((m, at) for m in markers if m in received and m not in arrived)
    times = [arrived[m] for m in markers]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert min(gaps) > STREAM_INTERVAL / 2, f"chunks were held back: gaps {gaps}"


def _fresh(conn: Conn, servers: Servers) -> None:
    pass


def _after_a_forwarded_request(conn: Conn, servers: Servers) -> None:
    conn.send(http_request("GET", f"http://127.0.0.1:{servers.web.port}/warm-up", "x"))
    assert conn.response().status == 200


@pytest.mark.parametrize("before", [
    pytest.param(_fresh, id="first-request"),
    pytest.param(_after_a_forwarded_request, id="kept-alive"),
])
@pytest.mark.parametrize(("url", "status", "error", "detail"), [
    ("https://127.0.0.1:{web}/", 400, "bad_request", "use CONNECT"),
    ("ftp://127.0.0.1:{web}/", 400, "bad_request", "http://"),
    ("http://user:pw@127.0.0.1:{web}/", 400, "bad_request", "credentials"),
    ("http://127.0.0.1:{unlisted}/", 403, "policy_denied", "http://127.0.0.1:{unlisted} not permitted by policy"),
    ("http://a.example.test/", 403, "policy_denied", "not permitted by policy"),  # wildcard listed for 443 only
    ("http://localhost:{named_web}/", 403, "ssrf_denied", "localhost resolves to a loopback address"),
    ("http://127.1:{web}/", 400, "bad_request", "ambiguous IP address form"),
    ("http://127.0.0.1:{closed}/", 502, "upstream_unreachable", "cannot connect"),
])
def test_forwarding_refused(proxy, servers, before, url, status, error, detail):
    ports = servers.ports()
    with Conn.open(proxy.port) as conn:
        before(conn, servers)
        requests = servers.requests()

        conn.send(http_request("GET", url.format(**ports), "x"))

        assert_proxy_refusal(conn.response(), status, error, detail.format(**ports))
    assert servers.requests() == requests, "a refused request reached a server"


# --- last: the process is fine -------------------------------------------------------------


def test_proxy_still_serves_and_logged_no_error(proxy, servers):
    with tunnel(proxy, servers, "127.0.0.1:{echo}") as conn:
        conn.send(b"still alive")
        assert conn.read_exact(11) == b"still alive"
    log = proxy.log_text()
    assert "Traceback" not in log and "Unhandled Error" not in log, log
