"""Integration: request smuggling, oversized and slow requests, against the real twistd process.

Every vector is sent with a raw socket on four channels: as the first head
the proxy listener parses, as the next request on a kept-alive forwarding
connection, and inside the intercepted TLS of inference.local (first and
kept-alive request).  Each must get a JSON refusal and a closed connection,
with nothing reaching a server; afterwards the process must still serve
well-behaved clients and have logged no traceback.  Bodies over the cap are
refused where the proxy holds them (inference.local, to rewrite C{model});
a forwarded body streams to its destination, uncapped.
"""
from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest

from egress_servers import Conn, HttpServer, KiB, Response, connect, mock_routes

pytestmark = pytest.mark.integration

HEAD_READ = 2.0
KEEPALIVE_IDLE = 2.0
MAX_HEAD_BYTES = 4096
MAX_HEADERS = 20
MAX_BODY_BYTES = 64 * KiB
VECTOR_PATH = "/vector"
SMUGGLED_PATH = "/smuggled"


@pytest.fixture(scope="module")
def web() -> Iterator[HttpServer]:
    server = HttpServer().start()
    yield server
    server.stop()


def config(web: HttpServer, head_read: float) -> dict[str, Any]:
    return {
        **mock_routes(),
        "policy": {"allow": [f"127.0.0.1:{web.port}"]},
        "limits": {"max_head_bytes": MAX_HEAD_BYTES, "max_headers": MAX_HEADERS, "max_body_bytes": MAX_BODY_BYTES},
        "timeouts": {"head_read": head_read, "keepalive_idle": KEEPALIVE_IDLE, "tls_handshake": 5, "connect": 2},
    }


@pytest.fixture(scope="module")
def proxy(start_module_proxy, web: HttpServer):  # type: ignore[no-untyped-def]
    return start_module_proxy(config(web, HEAD_READ))


@pytest.fixture(scope="module")
def patient_proxy(start_module_proxy, web: HttpServer):  # type: ignore[no-untyped-def]
    """One that waits long for heads, so stalled ones stay stalled for the whole test."""
    return start_module_proxy(config(web, 30))


# --- channels: where a request is sent ------------------------------------------------------


@dataclass
class Channel:
    """A connection ready for the next request, with the request-target and Host to use on it."""

    conn: Conn
    target: str
    host: str
    intercepted: bool

    def request(self, method: str, path: str = "") -> bytes:
        return f"{method} {self.target}{path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()

    def refusal(self, status: int, code: str) -> None:
        """Read the refusal: C{status}, JSON naming C{code}, then the connection closes."""
        response = self.conn.response(bodyless=True)  # a 2xx means "not refused": no need to read on
        document = response.json()
        # Inside inference.local errors have the SDKs' shape; outside, the proxy's own.
        assert response.status == status and code == (document["error"]["code"] if self.intercepted
                                                       else document["error"]), (response, document)
        assert self.conn.closed(), "the connection stayed open after a refusal"


def _forwarding(proxy: Any, web: HttpServer) -> Channel:
    return Channel(Conn.open(proxy.port), f"http://127.0.0.1:{web.port}", f"127.0.0.1:{web.port}", False)


def _intercepted(proxy: Any, web: HttpServer) -> Channel:
    response, conn = connect(proxy.port, "inference.local:443")
    assert response.status == 200, response
    conn.start_tls(ssl.create_default_context(cafile=str(proxy.ca_path)), "inference.local")
    return Channel(conn, "", "inference.local", True)


def _warm_up(channel: Channel) -> None:
    channel.conn.send(channel.request("GET", "/v1/models" if channel.intercepted else "/warm-up"))
    assert channel.conn.response().status == 200


CHANNELS: dict[str, tuple[Callable[[Any, HttpServer], Channel], bool]] = {
    "first-head": (_forwarding, False),
    "forwarding-kept-alive": (_forwarding, True),
    "intercepted": (_intercepted, False),
    "intercepted-kept-alive": (_intercepted, True),
}


@pytest.fixture(params=list(CHANNELS))
def channel(request, proxy, web) -> Iterator[Channel]:  # type: ignore[no-untyped-def]
    open_channel, warm = CHANNELS[request.param]
    opened = open_channel(proxy, web)
    try:
        if warm:
            _warm_up(opened)
        yield opened
    finally:
        opened.conn.close()
    assert not {VECTOR_PATH, SMUGGLED_PATH} & {path.split("?")[0] for path in web.paths()}, web.paths()


# --- the vectors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Vector:
    """A request: its line (with C{{target}}), header lines after Host, body, and whether the head ends."""

    headers: str = ""
    body: bytes = b""
    line: str = "POST {target} HTTP/1.1"
    terminated: bool = True

    def render(self, target: str, host: str) -> bytes:
        head = f"{self.line.format(target=target)}\r\nHost: {host}\r\n{self.headers}"
        return (head + ("\r\n" if self.terminated else "")).encode("latin-1") + self.body

    def send(self, conn: Conn, target: str, host: str, piece: int = 4 * KiB) -> None:
        data = self.render(target, host)
        conn.send_until_answered((data[i:i + piece] for i in range(0, len(data), piece)), pause=0.02)


SMUGGLED = f"0\r\n\r\nGET {SMUGGLED_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def chunked(size: int, piece: int = 8 * KiB) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (piece, b"x" * piece) for _ in range(size // piece)) + b"0\r\n\r\n"


def vector(id: str, status: int, headers: str = "", body: bytes = b"", marks: Any = (), **kwargs: Any) -> Any:
    code = {400: "bad_request", 413: "request_too_large", 431: "headers_too_large"}[status]
    return pytest.param(Vector(headers, body, **kwargs), status, code, id=id, marks=marks)


VECTORS = [
    vector("cl-te", 400, "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", SMUGGLED),
    vector("te-cl", 400, "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", SMUGGLED),
    vector("cl-differing-duplicates", 400, "Content-Length: 4\r\nContent-Length: 41\r\n", b"abcd" + SMUGGLED),
    vector("cl-equal-duplicates", 400, "Content-Length: 4\r\nContent-Length: 4\r\n", b"abcd"),
    vector("cl-list", 400, "Content-Length: 4, 4\r\n", b"abcd"),
    *(vector(f"cl-{name}", 400, f"Content-Length: {value}\r\n", b"abcd") for name, value in [
        ("plus", "+4"), ("negative", "-4"), ("hex", "0x4"), ("decimal", "4.0"), ("inner-space", "4 4"),
        ("19-digits", "1" * 19), ("empty", ""),
    ]),
    *(vector(f"te-{name}", 400, f"Transfer-Encoding: {value}\r\n", SMUGGLED) for name, value in [
        ("gzip", "gzip"), ("gzip-chunked", "gzip, chunked"), ("chunked-gzip", "chunked, gzip"),
        ("identity", "identity"), ("chunked-chunked", "chunked, chunked"), ("x-chunked", "xchunked"),
    ]),
    vector("te-duplicate-lines", 400, "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", SMUGGLED),
    vector("te-in-http-1.0", 400, "Transfer-Encoding: chunked\r\n", SMUGGLED, line="POST {target} HTTP/1.0"),
    vector("te-folded", 400, "Transfer-Encoding:\r\n chunked\r\n", SMUGGLED),
    vector("obs-fold", 400, "X-A: a\r\n b\r\n"),
    vector("obs-fold-tab", 400, "X-A: a\r\n\tb\r\n"),
    vector("bare-lf-in-value", 400, "X-A: a\nTransfer-Encoding: chunked\r\n", SMUGGLED),
    vector("bare-cr-in-value", 400, "X-A: a\rTransfer-Encoding: chunked\r\n", SMUGGLED),
    vector("nul-in-value", 400, "X-A: a\x00b\r\n"),
    vector("space-in-name", 400, "Transfer Encoding: chunked\r\n", SMUGGLED),
    vector("space-before-colon", 400, "Transfer-Encoding : chunked\r\n", SMUGGLED),
    vector("non-token-name", 400, "X(A): b\r\n"),
    vector("no-colon", 400, "X-A b\r\n"),
    vector("empty-name", 400, ": b\r\n"),
    vector("request-line-double-space", 400, line="POST  {target} HTTP/1.1"),
    vector("request-line-http-1.2", 400, line="POST {target} HTTP/1.2"),
    vector("request-line-lowercase-version", 400, line="POST {target} http/1.1"),
    vector("request-line-bare-lf", 400, line="POST {target} HTTP/1.1\nX-A: b"),
    vector("oversized-header", 431, f"X-Big: {'a' * (MAX_HEAD_BYTES + 100)}\r\n"),
    vector("oversized-head", 431, "".join(f"X-Pad-{i}: {'a' * 400}\r\n" for i in range(12))),
    vector("unterminated-line", 431, f"X-Big: {'a' * (MAX_HEAD_BYTES + 100)}", terminated=False),
    vector("too-many-headers", 431, "".join(f"X-N{i}: v\r\n" for i in range(MAX_HEADERS + 5))),
]
# On the channels that hold the body (inference.local's); a forwarded one streams.
HELD_BODY_VECTORS = [
    # No body follows: a declared length over the cap is refused before the body is read.
    vector("declared-body-too-large", 413, f"Content-Length: {MAX_BODY_BYTES + 1}\r\n"),
    vector("chunked-body-too-large", 413, "Transfer-Encoding: chunked\r\n", chunked(MAX_BODY_BYTES + 8 * KiB)),
]


def _attack(channel: Channel, vector: Vector, status: int, code: str) -> None:
    """Send C{vector} on C{channel} and check its refusal."""
    path = "/v1/chat/completions" if channel.intercepted else VECTOR_PATH
    vector.send(channel.conn, channel.target + path, channel.host)
    channel.refusal(status, code)


@pytest.mark.parametrize(("vector", "status", "code"), VECTORS)
def test_vector_is_refused(channel: Channel, vector: Vector, status: int, code: str):
    _attack(channel, vector, status, code)


@pytest.mark.parametrize("channel", ["intercepted", "intercepted-kept-alive"], indirect=True)
@pytest.mark.parametrize(("vector", "status", "code"), HELD_BODY_VECTORS)
def test_held_body_over_the_cap_is_refused(channel: Channel, vector: Vector, status: int, code: str):
    _attack(channel, vector, status, code)


CONNECT_LINE = "CONNECT inference.local:443 HTTP/1.1"


@pytest.mark.parametrize(("vector", "status", "code"), [
    vector("body", 400, "Content-Length: 5\r\n", b"abcde", line=CONNECT_LINE),
    vector("chunked", 400, "Transfer-Encoding: chunked\r\n", SMUGGLED, line=CONNECT_LINE),
    vector("cl-te", 400, "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", SMUGGLED, line=CONNECT_LINE),
    vector("cl-duplicates", 400, "Content-Length: 0\r\nContent-Length: 0\r\n", line=CONNECT_LINE),
    vector("oversized-head", 431, "".join(f"X-Pad-{i}: {'a' * 400}\r\n" for i in range(12)), line=CONNECT_LINE),
    vector("too-many-headers", 431, "".join(f"X-N{i}: v\r\n" for i in range(MAX_HEADERS + 5)), line=CONNECT_LINE),
])
def test_connect_head_vector_is_refused(proxy, web, vector: Vector, status: int, code: str):
    channel = _forwarding(proxy, web)
    with channel.conn:
        vector.send(channel.conn, "", "inference.local:443")

        channel.refusal(status, code)


# --- slow and idle clients ----------------------------------------------------------------


@pytest.mark.parametrize("channel", ["forwarding-kept-alive", "intercepted", "intercepted-kept-alive"],
                         indirect=True)
def test_idle_connection_is_closed(channel: Channel):
    start = time.monotonic()

    assert channel.conn.closed(timeout=KEEPALIVE_IDLE + 2)
    assert KEEPALIVE_IDLE - 0.5 < time.monotonic() - start


def _served(channel: Channel) -> float:
    """Seconds it takes a well-behaved request on C{channel} to be answered, checking the answer."""
    start = time.monotonic()
    channel.conn.send(channel.request("GET", "/v1/models" if channel.intercepted else "/well-behaved"))
    response: Response = channel.conn.response()
    assert response.status == 200, response
    return time.monotonic() - start


def test_stalled_heads_do_not_hold_up_others(patient_proxy, web):
    stalled: list[Conn] = []
    try:
        for _ in range(200):
            stalled.append(Conn.open(patient_proxy.port))
            stalled[-1].send(b"CONN")
        for open_channel, _ in CHANNELS.values():
            channel = open_channel(patient_proxy, web)
            with channel.conn:
                assert _served(channel) < 1
        assert not any(conn.readable(0) for conn in stalled), "a stalled head was answered"
    finally:
        for conn in stalled:
            conn.close()


# --- last: the process is fine -------------------------------------------------------------


def test_process_survived_and_logged_no_error(proxy, web):
    # Its own attack, so that it holds whichever tests ran before it: each vector, once,
    # on one of the channels in turn; then every channel still serves a well-behaved client.
    names = list(CHANNELS)
    for i, (attack, status, code) in enumerate(param.values for param in VECTORS):
        open_channel, warm = CHANNELS[names[i % len(names)]]
        channel = open_channel(proxy, web)
        with channel.conn:
            if warm:
                _warm_up(channel)
            _attack(channel, attack, status, code)
    for attack, status, code in (param.values for param in HELD_BODY_VECTORS):
        channel = _intercepted(proxy, web)
        with channel.conn:
            _attack(channel, attack, status, code)
    for open_channel, _ in CHANNELS.values():
        channel = open_channel(proxy, web)
        with channel.conn:
            _served(channel)
    assert not {VECTOR_PATH, SMUGGLED_PATH} & {path.split("?")[0] for path in web.paths()}, web.paths()
    assert proxy.process.poll() is None
    log = proxy.log_text()
    assert "Traceback" not in log and "Unhandled Error" not in log, log
