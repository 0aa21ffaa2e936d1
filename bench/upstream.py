"""A local streaming upstream for the benchmarks: asyncio HTTP/1.1, run as its own process.

It listens on 127.0.0.1 twice, with the same handler: in plain HTTP (what
the proxies forward inference requests to) and over TLS with a self-made
certificate (the direct path, and the destination of CONNECT tunnels).
Run C{python -m bench.upstream CERT KEY [SNDBUF]}; it prints one JSON line with its
ports once it listens.  With C{SNDBUF}, every accepted socket's send buffer is capped
at that many bytes (loopback benchmarks with many slow streams: an upstream on another
host would hold that memory, not the proxy's host).

Requests:
- C{POST .../chat/completions} with a JSON body.  C{body["bench"]} shapes
  the answer: C{events}, C{interval} (seconds between events), C{size}
  (padding bytes per event) and C{id} (to ask for its progress later).
  With C{"stream": true} the answer is SSE, one HTTP chunk per event, each
  stamped with its send time: C{data: {"t": <time.time()>, "i": n, "pad": ...}};
  otherwise a small JSON completion, with its send time in C{"t"}.
- C{GET /bytes/N}: N bytes of body, as fast as the connection takes them.
- C{GET /stats/ID}: C{{"sent": bytes}} handed to the kernel so far for stream ID.
"""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import sys
import time
from pathlib import Path

SERVER_NAME = "inference.local"
_BLOCK = b"x" * (1 << 20)
# A small chat completion; %r is the send time, so that a client can split its latency in two legs.
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "t": 0,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode().replace(b'"t": 0', b'"t": %r')


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed EC P-256 certificate for inference.local and 127.0.0.1; returns (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "navtwist bench upstream")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(SERVER_NAME), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "upstream.pem", directory / "upstream.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class _Progress:
    """How much of one response has left this process (written minus still buffered)."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self.written = 0

    @property
    def sent(self) -> int:
        return self.written - self._transport.get_write_buffer_size()


class Upstream:
    """The request handler shared by both listeners."""

    def __init__(self, sndbuf: int | None = None) -> None:
        self._progress: dict[str, _Progress] = {}
        self._sndbuf = sndbuf

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one keep-alive connection until the peer leaves."""
        if self._sndbuf is not None:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self._answer(writer, method, target, body)
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, method: str, target: str, body: bytes) -> None:
        if method == "POST" and target.endswith("/chat/completions"):
            document = json.loads(body)
            shape = document.get("bench", {})
            if document.get("stream"):
                await self._stream(writer, shape)
            else:
                _respond(writer, "application/json", _COMPLETION % time.time())
        elif method == "GET" and target.startswith("/bytes/"):
            await self._bytes(writer, int(target.rsplit("/", 1)[1]))
        elif method == "GET" and target.startswith("/stats/"):
            progress = self._progress.get(target.rsplit("/", 1)[1])
            _respond(writer, "application/json", json.dumps({"sent": progress.sent if progress else None}).encode())
        else:
            _respond(writer, "text/plain", b"not found", status="404 Not Found")
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, shape: dict) -> None:
        """SSE, one chunk per event, event i sent at start + i * interval (as fast as drained if 0)."""
        events, interval = int(shape.get("events", 10)), float(shape.get("interval", 0.0))
        pad = b'"' + _BLOCK[: int(shape.get("size", 16))] + b'"'
        progress = _Progress(writer.transport)
        if "id" in shape:
            self._progress[str(shape["id"])] = progress
        head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        writer.write(head)
        progress.written += len(head)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(events):
            if interval:
                delay = start + i * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            event = b'data: {"t": %r, "i": %d, "pad": %s}\n\n' % (time.time(), i, pad)
            chunk = b"%x\r\n%s\r\n" % (len(event), event)
            writer.write(chunk)
            progress.written += len(chunk)
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async def _bytes(self, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n" % n)
        block = memoryview(_BLOCK)
        while n > 0:
            writer.write(block[: min(n, len(block))])
            n -= len(block)
            await writer.drain()


def _respond(writer: asyncio.StreamWriter, content_type: str, body: bytes, status: str = "200 OK") -> None:
    writer.write(
        b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
        % (status.encode(), content_type.encode(), len(body), body)
    )


async def main(cert: str, key: str, sndbuf: int | None = None) -> None:
    """Listen in plain HTTP and TLS on ephemeral ports, print them, serve until killed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    upstream = Upstream(sndbuf)
    plain = await asyncio.start_server(upstream.serve, "127.0.0.1", 0, backlog=4096)
    tls = await asyncio.start_server(upstream.serve, "127.0.0.1", 0, backlog=4096, ssl=context)
    # The same TLS service on a second port: an origin that proxies intercept (the first is tunnelled).
    origin = await asyncio.start_server(upstream.serve, "127.0.0.1", 0, backlog=4096, ssl=context)
    ports = {"plain": plain.sockets[0].getsockname()[1], "tls": tls.sockets[0].getsockname()[1],
             "origin": origin.sockets[0].getsockname()[1]}
    print(json.dumps(ports), flush=True)
    await asyncio.gather(plain.serve_forever(), tls.serve_forever(), origin.serve_forever())


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None))
    except KeyboardInterrupt:
        pass
