"""asyncio benchmark clients on raw ssl connections: one HTTP/1.1 client, one function per scenario.

Every path ends in TLS between this client and whoever answers
C{inference.local}: the upstream itself (direct) or the proxy that intercepts
it.  L{HttpClient} timestamps every read with C{time.time()}, so arrival times
compare with the upstream's send stamps (same machine, same clock).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from bench.upstream import SERVER_NAME

INFERENCE_AUTHORITY = f"{SERVER_NAME}:443"
CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Path:
    """One way from the client to the upstream: straight to its TLS port, or through a proxy."""

    name: str
    ca_file: str  # what the client trusts for inference.local: the proxy's CA, or the upstream's cert
    upstream_cert: str  # what the client trusts end to end in a tunnel
    upstream_tls: tuple[str, int]
    proxy: tuple[str, int] | None = None


_contexts: dict[str, ssl.SSLContext] = {}


def _context(ca_file: str) -> ssl.SSLContext:
    context = _contexts.get(ca_file)
    if context is None:
        context = _contexts[ca_file] = ssl.create_default_context(cafile=ca_file)
        context.set_alpn_protocols(["http/1.1"])
    return context


class ProxyRefused(Exception):
    """The proxy answered CONNECT with something other than 200."""


async def _connect_via(proxy: tuple[str, int], authority: str, rcvbuf: int | None = None) -> socket.socket:
    """A socket on which C{proxy} has accepted C{CONNECT authority}; C{rcvbuf} caps its receive buffer."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:  # before connecting, so that the window is sized by it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await loop.sock_connect(sock, proxy)
        await loop.sock_sendall(sock, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:  # proxies send nothing after the head until the ClientHello
            data = await loop.sock_recv(sock, 4096)
            if not data:
                raise ProxyRefused("proxy closed during CONNECT")
            head += data
        if head.split(b" ", 2)[1] != b"200":
            raise ProxyRefused(head.split(b"\r\n", 1)[0].decode("latin-1"))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_client(path: Path, tunnel: bool = False, rate: float | None = None,
                      rcvbuf: int | None = None) -> HttpClient:
    """An L{HttpClient} over TLS to inference.local (or, with C{tunnel}, end to end to the upstream).

    C{tunnel} through a proxy is C{CONNECT 127.0.0.1:<upstream TLS port>}:
    a raw tunnel, the client's TLS goes to the upstream.  C{rate} caps reading, in bytes/s;
    C{rcvbuf} (through a proxy) caps the socket's receive buffer, so that a rate-capped reader reads
    in small steps instead of a large autotuned buffer at a time.
    """
    loop = asyncio.get_running_loop()
    ca_file = path.upstream_cert if tunnel else path.ca_file
    options: dict[str, Any] = {"ssl": _context(ca_file), "server_hostname": SERVER_NAME, "ssl_handshake_timeout": 30}
    factory = lambda: HttpClient(rate)  # noqa: E731
    if path.proxy is None:
        _, client = await loop.create_connection(factory, *path.upstream_tls, **options)
    else:
        host, port = path.upstream_tls
        sock = await _connect_via(path.proxy, f"{host}:{port}" if tunnel else INFERENCE_AUTHORITY, rcvbuf)
        _, client = await loop.create_connection(factory, sock=sock, **options)
    return client


async def open_origin(origin: tuple[str, int], ca_file: str, proxy: tuple[str, int] | None = None,
                      rate: float | None = None) -> HttpClient:
    """An L{HttpClient} over TLS to the HTTPS origin C{origin} (an IP literal), straight or through
    C{CONNECT origin} at C{proxy}; C{ca_file} is what the client trusts (an intercepting proxy's CA)."""
    loop = asyncio.get_running_loop()
    authority = f"{origin[0]}:{origin[1]}"
    options: dict[str, Any] = {"ssl": _context(ca_file), "server_hostname": origin[0], "ssl_handshake_timeout": 30}
    factory = lambda: HttpClient(rate, host=authority)  # noqa: E731
    if proxy is None:
        _, client = await loop.create_connection(factory, *origin, **options)
    else:
        sock = await _connect_via(proxy, authority)
        _, client = await loop.create_connection(factory, sock=sock, **options)
    return client


async def open_plain(address: tuple[str, int]) -> HttpClient:
    """An L{HttpClient} over plain TCP (for the upstream's stats)."""
    _, client = await asyncio.get_running_loop().create_connection(lambda: HttpClient(), *address)
    return client


@dataclass
class Event:
    index: int
    sent_at: float  # upstream's time.time() when it wrote the event
    arrived_at: float  # client's time.time() of the read that completed it
    read_no: int  # which read of the response completed it


@dataclass
class Response:
    """One response, with the time of each part's arrival."""

    sent_at: float
    keep_body: bool
    parse_events: bool
    status: int = 0
    head_at: float = 0.0
    done_at: float = 0.0
    body: bytearray = field(default_factory=bytearray)
    body_bytes: int = 0
    reads: int = 0  # reads that carried part of this response
    events: list[Event] = field(default_factory=list)


class HttpClient(asyncio.Protocol):
    """HTTP/1.1, one request at a time on one keep-alive connection.

    Parses Content-Length and chunked bodies incrementally and, for SSE,
    each C{data:} event across read boundaries.  With C{rate}, reading is
    paused whenever more than C{rate} bytes/s have been read.
    """

    def __init__(self, rate: float | None = None, host: str = SERVER_NAME) -> None:
        self.transport: asyncio.Transport | None = None
        self._host = host
        self.bytes_read = 0
        self._rate = rate
        self._rate_start = 0.0
        self._buffer = bytearray()
        self._events = bytearray()
        self._response: Response | None = None
        self._done: asyncio.Future[Response] | None = None
        self._state = "idle"
        self._remaining = 0
        self._chunked = False
        self._lost: Exception | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._rate_start = time.time()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.bytes_read += len(data)
        if self._response is not None:
            self._response.reads += 1
            self._buffer += data
            self._parse(now)
        if self._rate is not None:
            self._throttle(now)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionError("connection closed")
        if self._done is not None and not self._done.done():
            self._done.set_exception(self._lost)

    # -- API

    async def request(
        self,
        method: str,
        target: str,
        body: dict | None = None,
        keep_body: bool = True,
        parse_events: bool = True,
    ) -> Response:
        """Send a request and wait for the whole response."""
        return await self.start(method, target, body, keep_body, parse_events)

    def start(
        self,
        method: str,
        target: str,
        body: dict | None = None,
        keep_body: bool = True,
        parse_events: bool = True,
    ) -> asyncio.Future[Response]:
        """Send a request; the future resolves when its response is complete (see L{current})."""
        if self._lost is not None:
            raise self._lost
        payload = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {target} HTTP/1.1\r\nHost: {self._host}\r\nAccept: */*\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        self._response = Response(time.time(), keep_body, parse_events)
        self._done = asyncio.get_running_loop().create_future()
        self._state = "head"
        self.transport.write(head.encode() + b"\r\n" + payload)
        return self._done

    @property
    def current(self) -> Response | None:
        """The response being received (or last received)."""
        return self._response

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- parsing

    def _parse(self, now: float) -> None:
        response = self._response
        buffer = self._buffer
        while buffer and self._state != "idle":
            if self._state == "head":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
                del buffer[: end + 4]
                response.status = int(head[0].split(" ", 2)[1])
                response.head_at = now
                headers = {k.strip().lower(): v.strip().lower() for k, v in (h.split(":", 1) for h in head[1:])}
                self._chunked = "chunked" in headers.get("transfer-encoding", "")
                if self._chunked:
                    self._state = "size"
                else:
                    self._remaining = int(headers.get("content-length", "0"))
                    self._state = "data"
                    if not self._remaining:
                        self._finish(now)
            elif self._state == "size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                self._remaining = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
                del buffer[: end + 2]
                self._state = "data" if self._remaining else "trailer"
            elif self._state == "data":
                take = min(self._remaining, len(buffer))
                self._body(bytes(buffer[:take]) if take < len(buffer) else bytes(buffer), now)
                del buffer[:take]
                self._remaining -= take
                if not self._remaining:
                    if self._chunked:
                        self._state = "crlf"
                    else:
                        self._finish(now)
            elif self._state == "crlf":
                if len(buffer) < 2:
                    return
                del buffer[:2]
                self._state = "size"
            elif self._state == "trailer":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                del buffer[: end + 2]
                if end == 0:
                    self._finish(now)

    def _body(self, data: bytes, now: float) -> None:
        response = self._response
        response.body_bytes += len(data)
        if response.keep_body:
            response.body += data
        if not response.parse_events:
            return
        events = self._events
        events += data
        while (end := events.find(b"\n\n")) >= 0:
            line = bytes(events[:end])
            del events[: end + 2]
            if line.startswith(b"data: {"):
                document = json.loads(line[6:])
                response.events.append(Event(document["i"], document["t"], now, response.reads))

    def _finish(self, now: float) -> None:
        self._response.done_at = now
        self._state = "idle"
        self._events.clear()
        if not self._done.done():
            self._done.set_result(self._response)

    def _throttle(self, now: float) -> None:
        """Pause reading until the bytes read so far fit the rate."""
        ahead = self.bytes_read / self._rate - (now - self._rate_start)
        if ahead > 0:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(ahead, self._resume)

    def _resume(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()


# --- the scenarios ------------------------------------------------------------------


def chat(stream: bool, **shape: Any) -> dict:
    """A chat-completions request body; C{shape} goes to the upstream as C{bench}."""
    return {
        "model": "bench",
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
        "bench": shape,
    }


async def open_clients(paths: Sequence[Path]) -> dict[str, HttpClient]:
    """One warmed-up keep-alive client per path (handshake done, upstream connection made)."""
    opened = {}
    try:
        for path in paths:
            opened[path.name] = client = await open_client(path)
            await client.request("POST", CHAT_PATH, chat(False))
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(opened: dict[str, HttpClient]) -> None:
    for client in opened.values():
        client.close()


async def request_latency(paths: Sequence[Path], requests: int, warmup: int) -> dict[str, dict]:
    """Small non-streaming requests, one at a time on one keep-alive TLS connection per path,
    the paths taking turns request by request."""
    opened = await open_clients(paths)
    results = {name: {"latency_s": [], "request_leg_s": [], "response_leg_s": []} for name in opened}
    try:
        body = chat(False)
        for i in range(warmup + requests):
            for name, client in opened.items():
                response = await client.request("POST", CHAT_PATH, body)
                assert response.status == 200, (name, response.status)
                if i >= warmup:
                    answered_at = json.loads(response.body)["t"]  # the upstream's send time
                    result = results[name]
                    result["latency_s"].append(response.done_at - response.sent_at)
                    result["request_leg_s"].append(answered_at - response.sent_at)
                    result["response_leg_s"].append(response.done_at - answered_at)
    finally:
        close_all(opened)
    return results


async def event_timing(paths: Sequence[Path], streams: int, events: int, interval: float, size: int) -> dict[str, dict]:
    """C{streams} SSE streams per path, one at a time (the paths taking turns), on one
    keep-alive connection per path: per-event delay, reads per event and the gaps."""
    opened = await open_clients(paths)
    keys = ("ttft_s", "delay_s", "send_gap_s", "arrival_gap_s", "events", "reads", "coalesced")
    results: dict[str, dict[str, list]] = {name: {key: [] for key in keys} for name in opened}
    try:
        for _ in range(streams):
            for name, client in opened.items():
                response = await client.request("POST", CHAT_PATH, chat(True, events=events, interval=interval, size=size))
                got = response.events
                assert response.status == 200 and len(got) == events, (name, response.status, len(got))
                result = results[name]
                result["ttft_s"].append(got[0].arrived_at - response.sent_at)
                result["delay_s"] += [e.arrived_at - e.sent_at for e in got]
                result["send_gap_s"] += [b.sent_at - a.sent_at for a, b in itertools.pairwise(got)]
                result["arrival_gap_s"] += [b.arrived_at - a.arrived_at for a, b in itertools.pairwise(got)]
                result["events"].append(len(got))
                result["reads"].append(len({e.read_no for e in got}))
                result["coalesced"].append(sum(a.read_no == b.read_no for a, b in itertools.pairwise(got)))
    finally:
        close_all(opened)
    return results


async def one_stream(path: Path, events: int, interval: float, size: int) -> Response:
    """One SSE stream on its own new connection, checked complete."""
    client = await open_client(path)
    try:
        response = await client.request("POST", CHAT_PATH, chat(True, events=events, interval=interval, size=size))
    finally:
        client.close()
    if response.status != 200 or len(response.events) != events:
        raise RuntimeError(f"status {response.status}, {len(response.events)} events")
    return response


async def concurrent_streams(path: Path, streams: int, events: int, interval: float, size: int, timeout: float) -> dict:
    """C{streams} streams started at once, each on its own new connection.

    TTFB is measured from the common start (so it includes connecting, CONNECT
    and the TLS handshake) to the arrival of the first event.
    """
    start = time.time()

    async def one() -> tuple[float, float]:
        response = await one_stream(path, events, interval, size)
        return response.events[0].arrived_at - start, response.done_at - start

    outcomes = await asyncio.gather(*(asyncio.wait_for(one(), timeout) for _ in range(streams)), return_exceptions=True)
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    errors: dict[str, int] = {}
    for o in outcomes:
        if isinstance(o, BaseException):
            errors[type(o).__name__] = errors.get(type(o).__name__, 0) + 1
    return {
        "streams": streams,
        "completed": len(done),
        "errors": errors,
        "ttfb_s": [ttfb for ttfb, _ in done],
        "wall_s": max((end for _, end in done), default=time.time() - start),
    }


async def slow_reader(path: Path, stats: tuple[str, int], total: int, event_size: int, rate: float,
                      seconds: float) -> dict:
    """One big fast stream read at C{rate} bytes/s for C{seconds}; how far ahead did the upstream get?"""
    stream_id = f"slow-{path.name}-{time.time()}"
    client = await open_client(path, rate=rate)
    try:
        await client.request("POST", CHAT_PATH, chat(False))  # warm-up
        pending = client.start("POST", CHAT_PATH, chat(True, events=total // event_size, size=event_size, id=stream_id),
                               keep_body=False, parse_events=False)
        pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # it ends when we hang up
        await asyncio.sleep(seconds)
        read = client.current.body_bytes
        probe = await open_plain(stats)
        try:
            sent = json.loads((await probe.request("GET", f"/stats/{stream_id}")).body)["sent"]
        finally:
            probe.close()
    finally:
        client.close()
    return {"client_read": read, "upstream_sent": sent, "upstream_ahead": sent - read}


async def download(path: Path, nbytes: int) -> float:
    """Download C{nbytes} over end-to-end TLS through a tunnel (or directly) on a new connection; bytes/s."""
    client = await open_client(path, tunnel=True)
    try:
        response = await client.request("GET", f"/bytes/{nbytes}", keep_body=False, parse_events=False)
    finally:
        client.close()
    if response.body_bytes != nbytes:
        raise RuntimeError(f"{path.name}: got {response.body_bytes} of {nbytes} bytes")
    return nbytes / (response.done_at - response.sent_at)


async def tunnel_throughput(paths: Sequence[Path], nbytes: int, repeats: int) -> dict[str, dict]:
    """L{download} C{repeats} times per path, the paths taking turns."""
    rates: dict[str, list[float]] = {path.name: [] for path in paths}
    for _ in range(repeats):
        for path in paths:
            rates[path.name].append(await download(path, nbytes))
    return {name: {"bytes": nbytes, "bytes_per_s": values} for name, values in rates.items()}
