"""Integration: with C{upstream_proxy}, every upstream connection is a CONNECT through the parent.

A tiny parent proxy on 127.0.0.1 records each CONNECT target and its
Proxy-Authorization, then splices (it only ever dials loopback).  Tunnels,
forwarded http:// requests and inference calls must all go through it,
naming IP addresses (the ones navtwist checked, never a name), and a parent
that refuses must give the client a 502 that says so.
"""
from __future__ import annotations

import base64
import contextlib
import ipaddress
import socket
import threading
from typing import Any, Iterator

import pytest

from egress_servers import Conn, HttpServer, TcpServer, assert_proxy_refusal, connect, echo
from upstream import OPENAI_MODEL, Stream, Upstream, openai_chat_events, routes_config

pytestmark = pytest.mark.integration

AUTH = "parent-user:parent-secret"


class ParentProxy:
    """A CONNECT-only proxy on 127.0.0.1: logs targets, refuses with C{refuse} when set, else splices."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.targets: list[str] = []
        self.authorizations: list[str | None] = []
        self.refuse: int | None = None
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []

    def start(self) -> ParentProxy:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._sock.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.close()

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self._open.append(client)
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                client.close()
                return
            head += chunk
        head, _, early = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = dict(line.split(": ", 1) for line in lines[1:])
        self.targets.append(target)
        self.authorizations.append(headers.get("Proxy-Authorization"))
        host, _, port = target.rpartition(":")
        address = ipaddress.ip_address(host.strip("[]"))  # a name here fails the test: it must be an address
        if method != "CONNECT" or self.refuse is not None or not address.is_loopback:  # never beyond loopback
            client.sendall(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % (self.refuse or 403))
            client.close()
            return
        upstream = socket.create_connection((str(address), int(port)), timeout=10)
        self._open.append(upstream)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if early:
            upstream.sendall(early)
        self._spawn(_pipe, upstream, client)
        _pipe(client, upstream)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@pytest.fixture
def parent() -> Iterator[ParentProxy]:
    server = ParentProxy().start()
    yield server
    server.stop()


@pytest.fixture
def echo_server() -> Iterator[TcpServer]:
    server = TcpServer(echo).start()
    yield server
    server.stop()


@pytest.fixture
def web() -> Iterator[HttpServer]:
    server = HttpServer().start()
    yield server
    server.stop()


@pytest.fixture
def proxy(start_proxy, upstream: Upstream, parent: ParentProxy, echo_server: TcpServer, web: HttpServer):  # type: ignore[no-untyped-def]
    allow = [f"127.0.0.1:{echo_server.port}", f"localhost:{echo_server.port}", f"127.0.0.1:{web.port}"]
    config = {**routes_config(upstream.url), "policy": {"allow": allow},
              "upstream_proxy": {"url": f"http://127.0.0.1:{parent.port}", "auth_env": "PARENT_AUTH"}}
    return start_proxy(config, env={"PARENT_AUTH": AUTH})


def _expected_auth() -> str:
    return "Basic " + base64.b64encode(AUTH.encode()).decode()


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_tunnels_go_through_the_parent_to_the_checked_address(proxy, parent, echo_server, name) -> None:  # type: ignore[no-untyped-def]
    response, conn = connect(proxy.port, f"{name}:{echo_server.port}")
    with conn:
        assert response.status == 200, response
        conn.send(b"ping")
        assert conn.read_exact(4) == b"ping"
    assert parent.targets == [f"127.0.0.1:{echo_server.port}"]  # the address, even when asked by name
    assert parent.authorizations == [_expected_auth()]
    assert "parent-secret" not in proxy.log_text() and _expected_auth() not in proxy.log_text()


def test_forwarded_http_goes_through_the_parent(proxy, parent, web) -> None:  # type: ignore[no-untyped-def]
    with Conn.open(proxy.port) as conn:
        conn.send(f"GET http://127.0.0.1:{web.port}/hello HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n\r\n".encode())
        assert conn.response().status == 200
    assert parent.targets == [f"127.0.0.1:{web.port}"]
    assert web.paths() == ["/hello"]


def test_inference_goes_through_the_parent(proxy, parent, upstream, openai_client) -> None:  # type: ignore[no-untyped-def]
    upstream.script = Stream(events=openai_chat_events(["Hello", " world"]))
    stream = openai_client.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello world"
    assert parent.targets == [f"127.0.0.1:{upstream.port}"]
    assert upstream.exchanges[-1].json()["model"] == OPENAI_MODEL


def test_a_refusing_parent_is_a_502_that_says_so(proxy, parent, echo_server, web, openai_client) -> None:  # type: ignore[no-untyped-def]
    import openai

    parent.refuse = 403
    response, conn = connect(proxy.port, f"127.0.0.1:{echo_server.port}")
    with conn:
        assert_proxy_refusal(response, 502, "upstream_unreachable", "parent proxy refused CONNECT: 403")
    with Conn.open(proxy.port) as conn:
        conn.send(f"GET http://127.0.0.1:{web.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n\r\n".encode())
        assert_proxy_refusal(conn.response(), 502, "upstream_unreachable", "parent proxy refused CONNECT: 403")
    with pytest.raises(openai.APIStatusError) as info:
        openai_client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502 and "parent proxy refused CONNECT: 403" in str(info.value)
    assert len(parent.targets) == 3 and web.paths() == []
