"""A real, scriptable HTTP/1.1 upstream on 127.0.0.1 for the integration tests.

The server runs in background threads (one per connection).  A test chooses
what it answers by assigning a script to L{Upstream.script}; every request is
recorded as an L{Exchange}, which also records what happened while answering
it: when each event was sent, how many body bytes went out, whether the
response completed, and when the proxy was seen to close the connection.

All times are C{time.monotonic()} values, comparable with the test's own.
"""
from __future__ import annotations

import json
import select
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable

POLL = 0.05  # how often a waiting upstream looks for the proxy having closed

# What the proxy under test is configured with, hence what the upstream must see.
INFERENCE = "inference.local"
BASE = f"https://{INFERENCE}"  # the URL clients use
OPENAI_KEY = "sk-route-secret"
ANTHROPIC_KEY = "sk-ant-route-secret"
OPENAI_MODEL = "route-model"
ANTHROPIC_MODEL = "claude-route-model"
OPENAI_PROTOCOLS = ("openai_chat_completions", "openai_completions", "openai_responses",
                    "openai_embeddings", "model_discovery")


def routes_config(base_url: str, **route_options: Any) -> dict[str, Any]:
    """The proxy config (minus listen/ca_dir) routing to an upstream at C{base_url}.

    One OpenAI-style route (its endpoint ending in /v1) and one Anthropic
    route; C{route_options} (e.g. C{first_byte_timeout}) go into both.
    """
    return {
        "routes": [
            {"name": INFERENCE, "endpoint": f"{base_url}/v1", "model": OPENAI_MODEL,
             "protocols": list(OPENAI_PROTOCOLS), "api_key": OPENAI_KEY, "provider_type": "openai",
             **route_options},
            {"name": INFERENCE, "endpoint": base_url, "model": ANTHROPIC_MODEL,
             "protocols": ["anthropic_messages"], "api_key": ANTHROPIC_KEY, "provider_type": "anthropic",
             **route_options},
        ],
        "timeouts": {"head_read": 30, "tls_handshake": 10, "keepalive_idle": 60, "write_stall": 60},
    }


def read_request_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body a stdlib handler is about to read, chunked or by length."""
    if "chunked" in handler.headers.get("transfer-encoding", "").lower():
        parts = []
        while size := int(handler.rfile.readline().split(b";")[0].strip(), 16):
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()
        while handler.rfile.readline() not in (b"\r\n", b""):
            pass
        return b"".join(parts)
    return handler.rfile.read(int(handler.headers.get("content-length") or 0))


class PeerClosed(Exception):
    """The proxy closed (or reset) the connection while we were answering."""


@dataclass
class Exchange:
    """One request the upstream received, and how answering it went."""

    method: str
    path: str  # request-target, query string included
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    received_at: float
    events_sent: list[tuple[float, bytes]] = field(default_factory=list)
    bytes_sent: int = 0  # body payload bytes handed to the kernel successfully
    completed: bool = False  # the whole response, terminator included, was sent
    peer_closed_at: float | None = None  # when a closed/reset connection was noticed
    done: threading.Event = field(default_factory=threading.Event)

    def json(self) -> Any:
        return json.loads(self.body)

    def sent_at(self, marker: str) -> float:
        """When the first event containing C{marker} was sent."""
        needle = marker.encode("utf-8")
        for at, event in self.events_sent:
            if needle in event:
                return at
        raise AssertionError(f"no event containing {marker!r} was sent")

    def wait(self, timeout: float = 5.0) -> None:
        """Wait until the upstream has finished with this request, one way or another."""
        if not self.done.wait(timeout):
            raise AssertionError(f"upstream still busy with {self.method} {self.path} after {timeout} s")


# --- scripts: what the upstream answers -----------------------------------------


@dataclass(frozen=True, kw_only=True)
class Script:
    """Base of all scripts; C{headers_delay} waits before the status line."""

    headers_delay: float = 0.0

    def serve(self, conn: _Connection, exchange: Exchange) -> None:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Json(Script):
    """A fixed JSON document with a content-length.

    With C{die_after}, only that many bytes of it are sent, then the
    connection is closed.
    """

    body: Any = field(default_factory=dict)
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    die_after: int | None = None

    def serve(self, conn: _Connection, exchange: Exchange) -> None:
        payload = json.dumps(self.body).encode("utf-8")
        head = [("content-type", "application/json"), ("content-length", str(len(payload))), *self.headers]
        conn.send_head(self.status, head)
        if self.die_after is not None:
            conn.send_body(exchange, payload[:self.die_after])
            conn.die()
            return
        conn.send_body(exchange, payload)
        exchange.completed = True


@dataclass(frozen=True, kw_only=True)
class Stream(Script):
    """SSE events, one chunk each, C{interval} seconds apart.

    With C{die_after}, only that many events are sent, then the connection is
    closed without the chunked terminator.
    """

    events: tuple[bytes, ...]
    interval: float = 0.0
    die_after: int | None = None
    gzip: bool = False  # each event compressed and flushed on its own, as streaming servers do

    def serve(self, conn: _Connection, exchange: Exchange) -> None:
        head = [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")]
        compressor = zlib.compressobj(wbits=31) if self.gzip else None
        conn.send_head(200, head + [("content-encoding", "gzip")] if compressor else head)
        for i, event in enumerate(self.events):
            if i == self.die_after:
                conn.die()
                return
            if i and self.interval:
                conn.wait_unless_closed(self.interval)
            data = compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH) if compressor else event
            conn.send_chunk(exchange, data)
            exchange.events_sent.append((time.monotonic(), event))
        if compressor:
            conn.send_chunk(exchange, compressor.flush())
        conn.end_chunks()
        exchange.completed = True


@dataclass(frozen=True, kw_only=True)
class Firehose(Script):
    """SSE events of C{event_size} bytes, sent as fast as the proxy accepts them, up to C{total}."""

    total: int
    event_size: int = 64 * 1024

    def serve(self, conn: _Connection, exchange: Exchange) -> None:
        conn.send_head(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])
        event = b"data: " + b"x" * (self.event_size - 8) + b"\n\n"
        while exchange.bytes_sent + len(event) <= self.total:
            conn.send_chunk(exchange, event)
        conn.end_chunks()
        exchange.completed = True


@dataclass(frozen=True, kw_only=True)
class Encoded(Script):
    """Body bytes sent as they are under a C{Content-Encoding}: by content-length, or
    chunked in C{chunk}-byte pieces (framing always complete, whatever the bytes)."""

    body: bytes
    encoding: str = "gzip"
    content_type: str = "application/json"
    chunk: int | None = None

    def serve(self, conn: _Connection, exchange: Exchange) -> None:
        head = [("content-type", self.content_type), ("content-encoding", self.encoding)]
        if self.chunk is None:
            conn.send_head(200, head + [("content-length", str(len(self.body)))])
            conn.send_body(exchange, self.body)
        else:
            conn.send_head(200, head + [("transfer-encoding", "chunked")])
            for i in range(0, len(self.body), self.chunk):
                conn.send_chunk(exchange, self.body[i:i + self.chunk])
            conn.end_chunks()
        exchange.completed = True


@dataclass(frozen=True, kw_only=True)
class ByPath(Script):
    """C{paths[path]} for requests to that path (query ignored), C{default} for the others."""

    paths: dict[str, Script]
    default: Script

    def serve(self, conn: _Connection, exchange: Exchange) -> None:
        run(self.paths.get(exchange.path.split("?")[0], self.default), conn, exchange)


def run(script: Script, conn: _Connection, exchange: Exchange) -> None:
    if script.headers_delay:
        conn.wait_unless_closed(script.headers_delay)
    script.serve(conn, exchange)


# --- event builders ----------------------------------------------------------------


def sse(data: Any, event: str | None = None) -> bytes:
    """One SSE event; C{data} is JSON-encoded unless it is already a string."""
    text = data if isinstance(data, str) else json.dumps(data)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n".encode("utf-8")


def tokens(n: int) -> list[str]:
    """C{n} distinct tokens, none a substring of another."""
    return [f"w{i:02d} " for i in range(n)]


def openai_chat_events(parts: Iterable[str], model: str = OPENAI_MODEL) -> tuple[bytes, ...]:
    """A chat.completion.chunk per part (the last with finish_reason), then [DONE]."""
    parts = list(parts)
    events = []
    for i, text in enumerate(parts):
        delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
        finish = "stop" if i == len(parts) - 1 else None
        events.append(sse({
            "id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }))
    events.append(sse("[DONE]"))
    return tuple(events)


def anthropic_message_events(parts: Iterable[str], model: str = ANTHROPIC_MODEL, input_tokens: int = 3,
                             output_tokens: int | None = None) -> tuple[bytes, ...]:
    """The event sequence of a streamed Anthropic message whose text is C{parts};
    the output token count defaults to one per part."""
    parts = list(parts)
    message = {
        "id": "msg_up", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 0},
    }
    return (
        sse({"type": "message_start", "message": message}, "message_start"),
        sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start"),
        *(sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
              "content_block_delta") for text in parts),
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": len(parts) if output_tokens is None else output_tokens}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    )


# --- the server --------------------------------------------------------------------


class _Connection:
    """Low-level writes on one upstream connection, noticing when the proxy has gone."""

    def __init__(self, handler: _Handler) -> None:
        self._handler = handler
        self._sock: socket.socket = handler.connection

    def _closed(self) -> PeerClosed:
        self._handler.close_connection = True
        return PeerClosed()

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError:  # broken pipe, reset, or the socket timeout: the proxy is gone/stuck
            raise self._closed() from None

    def send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{k}: {v}" for k, v in headers)]
        self._send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send_body(self, exchange: Exchange, payload: bytes) -> None:
        self._send(payload)
        exchange.bytes_sent += len(payload)

    def send_chunk(self, exchange: Exchange, payload: bytes) -> None:
        self._send(b"%x\r\n%s\r\n" % (len(payload), payload))
        exchange.bytes_sent += len(payload)

    def end_chunks(self) -> None:
        self._send(b"0\r\n\r\n")

    def die(self) -> None:
        """Close the connection abruptly: no terminator, no further bytes."""
        self._handler.close_connection = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def wait_unless_closed(self, seconds: float) -> None:
        """Sleep C{seconds}, polling every L{POLL} s for the proxy closing the connection.

        @raise PeerClosed: the proxy closed or reset the connection meanwhile.
        """
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self._sock], [], [], min(POLL, remaining))
            if not readable:
                continue
            try:
                peeked = self._sock.recv(1, socket.MSG_PEEK)
            except OSError:
                raise self._closed() from None
            if not peeked:
                raise self._closed()
            time.sleep(min(POLL, max(remaining, 0)))  # unexpected bytes: keep waiting, without spinning


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # bounds a keep-alive read or a blocked send; the fixture shuts sockets down sooner
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.upstream._track(self.connection, threading.current_thread())

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.upstream._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class's name
        pass  # keep pytest output quiet

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        return read_request_body(self)

    def _serve(self) -> None:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        upstream = self.server.upstream
        exchange = Exchange(self.command, self.path, headers, self._read_body(), time.monotonic())
        upstream._record(exchange)
        conn = _Connection(self)
        try:
            run(upstream.script, conn, exchange)
        except PeerClosed:
            exchange.peer_closed_at = time.monotonic()
        finally:
            exchange.done.set()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    upstream: Upstream


class Upstream:
    """The upstream server; C{script} decides how every request is answered."""

    def __init__(self) -> None:
        self.script: Script = Json(body={"ok": True})
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []
        self._open: dict[socket.socket, threading.Thread] = {}
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.upstream = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="upstream", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def exchanges(self) -> list[Exchange]:
        """A snapshot of every request received so far, in order."""
        with self._lock:
            return list(self._exchanges)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Exchange]:
        """Wait until at least C{count} requests have been received."""
        deadline = time.monotonic() + timeout
        while len(exchanges := self.exchanges) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"upstream received {len(exchanges)} requests, expected {count}")
            time.sleep(0.01)
        return exchanges

    def only(self, timeout: float = 5.0) -> Exchange:
        """The single request received (waiting for it), asserting there was exactly one."""
        exchanges = self.wait_for(1, timeout)
        assert len(exchanges) == 1, [(e.method, e.path) for e in exchanges]
        return exchanges[0]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, cut every open connection and wait for the threads."""
        self._server.shutdown()
        with self._lock:
            open_connections = dict(self._open)
        for sock in open_connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(5)
        for thread in open_connections.values():
            thread.join(5)
        stuck = [t.name for t in open_connections.values() if t.is_alive()]
        assert not stuck, f"upstream handler threads did not stop: {stuck}"

    def _record(self, exchange: Exchange) -> None:
        with self._lock:
            self._exchanges.append(exchange)

    def _track(self, sock: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._open[sock] = thread

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.pop(sock, None)
