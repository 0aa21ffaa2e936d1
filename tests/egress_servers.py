"""Loopback servers and raw clients for the egress integration tests.

The servers (TCP echo and banner; HTTP and HTTPS) run in daemon threads
on 127.0.0.1 or ::1 and record what reached them, so a test can check both
what got through the proxy and that a refused request never arrived.  The
client side is L{Conn}: one plain or TLS socket with a read buffer, enough
HTTP/1.1 to read a response off it, and nothing that would tidy up what the
proxy sends.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import select
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from upstream import read_request_body

TIMEOUT = 10.0  # every socket operation here is bounded by this
KiB = 1024
MiB = 1024 * KiB


# --- a server certificate ---------------------------------------------------------------


@dataclass(frozen=True)
class ServerCert:
    """A self-signed certificate for localhost, 127.0.0.1 and ::1, and its key."""

    cert_path: Path
    key_path: Path
    der: bytes

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def client_context(self) -> ssl.SSLContext:
        """Trusts this certificate only (and so never the proxy's CA)."""
        return ssl.create_default_context(cafile=str(self.cert_path))


def make_server_cert(directory: Path) -> ServerCert:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "navtwist egress test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ServerCert(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


# --- TCP servers ------------------------------------------------------------------------


@dataclass
class Peer:
    """What a TCP server saw on one connection (hashes of everything, the first 64 KiB kept)."""

    received: int = 0
    sent: int = 0
    received_hash: Any = field(default_factory=hashlib.sha256)
    sent_hash: Any = field(default_factory=hashlib.sha256)
    data: bytearray = field(default_factory=bytearray)
    eof: threading.Event = field(default_factory=threading.Event)  # the client's FIN arrived
    done: threading.Event = field(default_factory=threading.Event)  # the handler has finished

    def recv(self, sock: socket.socket, size: int = 256 * KiB) -> bytes:
        data = sock.recv(size)
        if not data:
            self.eof.set()
        self.received += len(data)
        self.received_hash.update(data)
        if len(self.data) < 64 * KiB:
            self.data += data
        return data

    def send(self, sock: socket.socket, data: bytes) -> None:
        sock.sendall(data)
        self.sent += len(data)
        self.sent_hash.update(data)


Handler = Callable[[socket.socket, Peer], None]


class TcpServer:
    """Accepts on C{host} and runs C{handler(connection, peer)} in a thread per connection."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._tls = tls
        self._listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._listener.bind((host, 0))
        self._listener.listen(512)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.peers: list[Peer] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=f"tcp-{self.port}", daemon=True)

    @property
    def accepted(self) -> int:
        return len(self.peers)

    def last_peer(self, timeout: float = 5.0) -> Peer:
        """The newest connection's record, once its handler has finished."""
        peer = self.peers[-1]
        assert peer.done.wait(timeout), "the server is still busy with the connection"
        return peer

    def start(self) -> TcpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for sock in self._open:
                _shut(sock)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(TIMEOUT)
            peer = Peer()
            with self._lock:
                self.peers.append(peer)
                self._open.add(sock)
            threading.Thread(target=self._serve, args=(sock, peer), daemon=True).start()

    def _serve(self, sock: socket.socket, peer: Peer) -> None:
        try:
            conn = self._tls.wrap_socket(sock, server_side=True) if self._tls else sock
            self._handler(conn, peer)
        except (OSError, ValueError):  # resets, timeouts and TLS errors end the connection
            pass
        finally:
            peer.done.set()
            with self._lock:
                self._open.discard(sock)
            sock.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def echo(sock: socket.socket, peer: Peer) -> None:
    """Send back everything; after the client's FIN, send ours."""
    while data := peer.recv(sock):
        peer.send(sock, data)
    if not isinstance(sock, ssl.SSLSocket):
        sock.shutdown(socket.SHUT_WR)


BANNER = b"hello from upstream; no more from me\n"


def banner(sock: socket.socket, peer: Peer) -> None:
    """Send L{BANNER} and FIN first, then read what the client still sends, to its FIN."""
    peer.send(sock, BANNER)
    sock.shutdown(socket.SHUT_WR)
    while peer.recv(sock):
        pass


BLOCK = bytes(range(256)) * (4 * KiB)  # 1 MiB


def blast(sock: socket.socket, peer: Peer) -> None:
    """A throughput peer: after C{"D n\\n"} it sends n bytes; after C{"U n\\n"} it reads n and says C{"ok\\n"}."""
    command = b""
    while b"\n" not in command:
        chunk = sock.recv(64)
        if not chunk:
            return
        command += chunk
    line, _, early = command.partition(b"\n")
    op, size = line.split()
    remaining = int(size)
    if op == b"D":
        view = memoryview(BLOCK)
        while remaining:
            n = min(remaining, len(BLOCK))
            sock.sendall(view[:n])
            remaining -= n
    else:
        remaining -= len(early)
        buffer = bytearray(MiB)
        while remaining > 0:
            n = sock.recv_into(buffer)
            if not n:
                return
            remaining -= n
        sock.sendall(b"ok\n")


def refusing_port() -> socket.socket:
    """A bound, never-listening socket: connections to its port are refused while it is open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


# --- an HTTP/1.1 server ----------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request an L{HttpServer} received."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]  # lower-cased names, in order
    body: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


class QuietHandler(BaseHTTPRequestHandler):
    """The base of the test origins' handlers: HTTP/1.1 keep-alive, reads bounded by L{TIMEOUT}, no stderr log."""

    protocol_version = "HTTP/1.1"
    timeout = TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class's name
        pass

    def answer(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
        """Send a whole response: C{headers}, a content-length, C{payload}."""
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


STREAM_PARTS = 5
STREAM_INTERVAL = 0.2


class _WebHandler(QuietHandler):
    """C{/stream...}: chunked, L{STREAM_PARTS} chunks L{STREAM_INTERVAL} s apart; else a JSON echo."""

    server: _WebServer

    def do_GET(self) -> None:
        body = self._read_body()
        headers = tuple((name.lower(), value) for name, value in self.headers.items())
        self.server.seen.append(Seen(self.command, self.path, headers, body))
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(STREAM_PARTS):
                if i:
                    time.sleep(STREAM_INTERVAL)
                part = b"part-%d\n" % i
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        payload = json.dumps({"method": self.command, "path": self.path, "body": body.decode("latin-1")}).encode()
        self.answer(200, [("content-type", "application/json")], payload)

    do_POST = do_PUT = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        return read_request_body(self)


class LoopbackHttpServer(ThreadingHTTPServer):
    """A threaded HTTP server for tests (HTTPS with C{tls}): daemon threads, no join on close."""

    daemon_threads = True
    block_on_close = False
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake happens here, in the connection's thread, not in the accept loop.
        if self.tls is not None:
            request = self.tls.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)


ServerT = TypeVar("ServerT", bound=LoopbackHttpServer)
RunningT = TypeVar("RunningT", bound="ServerThread[Any]")


class ServerThread(Generic[ServerT]):
    """Runs C{server} in a daemon thread between L{start} and L{stop}; the one copy of that for every test origin."""

    def __init__(self, server: ServerT) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self: RunningT) -> RunningT:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@contextmanager
def tls_origin(handler: type[BaseHTTPRequestHandler], cert: ServerCert) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 answering with C{handler} for the block; yields its port."""
    server = LoopbackHttpServer(("127.0.0.1", 0), handler)
    server.tls = cert.server_context()
    running = ServerThread(server).start()
    try:
        yield running.port
    finally:
        running.stop()


class _WebServer(LoopbackHttpServer):
    seen: list[Seen]


class HttpServer(ServerThread[_WebServer]):
    """An HTTP/1.1 keep-alive server on 127.0.0.1 (HTTPS with C{tls}); C{seen} lists its requests."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        server = _WebServer(("127.0.0.1", 0), _WebHandler)
        server.tls = tls
        server.seen = []
        super().__init__(server)

    @property
    def seen(self) -> list[Seen]:
        return self._server.seen

    def paths(self) -> list[str]:
        return [request.path for request in self.seen]


# --- the client side ----------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)


class Conn:
    """One client connection, plain or TLS, with a read buffer.

    With C{trace}, every read is also recorded as C{(monotonic time, bytes)}.
    """

    def __init__(self, sock: socket.socket, trace: bool = False) -> None:
        self.sock = sock
        self.buffer = b""
        self._eof = False
        self.trace: list[tuple[float, bytes]] | None = [] if trace else None

    @classmethod
    def open(cls, port: int, host: str = "127.0.0.1", rcvbuf: int | None = None, trace: bool = False) -> Conn:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.settimeout(TIMEOUT)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: fixes the window
        sock.connect((host, port))
        return cls(sock, trace)

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> ssl.SSLSocket:
        assert not self.buffer, f"bytes after the CONNECT response: {self.buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        return self.sock

    def readable(self, timeout: float) -> bool:
        """Whether bytes or the end arrive within C{timeout} s; what arrives is buffered.

        A TLS socket can be readable with no application data for us (a
        session ticket), so this reads rather than trusting select().
        """
        deadline = time.monotonic() + timeout
        while not (self.buffer or self._eof):
            if not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
                if not select.select([self.sock], [], [], max(deadline - time.monotonic(), 0))[0]:
                    return False
            self.sock.setblocking(False)
            try:
                self._more()
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            except EOFError:
                pass
            finally:
                self.sock.settimeout(TIMEOUT)
        return True

    def _more(self) -> None:
        chunk = b"" if self._eof else self.sock.recv(256 * KiB)
        if not chunk:
            self._eof = True
            raise EOFError(f"connection closed; unread: {self.buffer[:300]!r}")
        if self.trace is not None:
            self.trace.append((time.monotonic(), chunk))
        self.buffer += chunk

    def read_until(self, marker: bytes) -> bytes:
        """Everything up to and including C{marker}."""
        while (end := self.buffer.find(marker)) < 0:
            self._more()
        data, self.buffer = self.buffer[:end + len(marker)], self.buffer[end + len(marker):]
        return data

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._more()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_to_eof(self) -> bytes:
        try:
            while True:
                self._more()
        except EOFError:
            pass
        data, self.buffer = self.buffer, b""
        return data

    def response(self, bodyless: bool = False) -> Response:
        """Read one response; C{bodyless} for the answer to CONNECT (a 2xx has no body)."""
        head = self.read_until(b"\r\n\r\n")[:-4].decode("latin-1")
        status_line, *lines = head.split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if (bodyless and 200 <= status < 300) or status in (204, 304) or status < 200:
            body = b""
        elif "content-length" in headers:
            body = self.read_exact(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._chunked_body()
        else:
            body = self.read_to_eof()
        return Response(status, headers, body)

    def _chunked_body(self) -> bytes:
        parts = []
        while size := int(self.read_until(b"\r\n").split(b";")[0], 16):
            parts.append(self.read_exact(size))
            assert self.read_exact(2) == b"\r\n"
        while self.read_until(b"\r\n") != b"\r\n":  # trailers
            pass
        return b"".join(parts)

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the peer ends the connection (FIN or reset) within C{timeout} s with nothing more sent."""
        try:
            if not self.readable(timeout):
                return False
        except (ConnectionError, ssl.SSLError):
            return True
        if self.buffer:
            raise AssertionError(f"unexpected bytes: {self.buffer[:300]!r}")
        return True

    def send_until_answered(self, pieces: Iterable[bytes], pause: float = 0.0) -> None:
        """Send C{pieces} one by one, stopping as soon as an answer is waiting.

        A refusal usually comes before the client has sent everything; sending
        on would make the proxy's kernel answer the unread bytes with a reset,
        which can destroy the refusal before we read it.
        """
        for piece in pieces:
            if self.readable(pause):
                return
            try:
                self.send(piece)
            except (BrokenPipeError, ConnectionResetError):
                return

    def close(self) -> None:
        self.sock.close()


def connect(proxy_port: int, target: str, early: bytes = b"", rcvbuf: int | None = None) -> tuple[Response, Conn]:
    """Send C{CONNECT target} (with C{early} bytes right behind the head) to the proxy."""
    conn = Conn.open(proxy_port, rcvbuf=rcvbuf)
    conn.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + early)
    return conn.response(bodyless=True), conn


def assert_proxy_refusal(response: Response, status: int, error: str, detail: str | None = None) -> dict:
    """A refusal in the proxy's own shape C{{"error": code, "detail": text}}; C{detail} is a substring."""
    document = response.json()
    assert (response.status, document["error"]) == (status, error), (response, document)
    assert set(document) == {"error", "detail"}, document
    if detail is not None:
        assert detail in document["detail"], document
    return document


def mock_routes() -> dict[str, Any]:
    """Config routes for inference.local answered by navtwist's own mock backend (no upstream)."""
    return {"routes": [{"name": "inference.local", "endpoint": "mock://", "model": "navtwist-mock",
                        "protocols": ["openai_chat_completions", "model_discovery"]}]}
