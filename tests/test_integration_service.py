"""Integration: navtwist as a service: graceful drain on SIGTERM, the admin
endpoint's metrics moving with real traffic, and plugins end to end.

The proxy is the real C{twistd -n navtwist}; everything runs on 127.0.0.1
and every wait is bounded.
"""
from __future__ import annotations

import queue
import signal
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from navtwist.inference.errors import stream_error_event
from conftest import TIMEOUT, Tunnel, _free_port, _recv_head
from routing_helpers import (  # noqa: F401  (fixtures are used by name)
    Fed,
    NarrowTunnel,
    httpx_through,
    metric_samples,
    metric_value,
    openai_events_with_usage,
    openai_through,
    request_records,
    run_twistd,
    tcp_queues,
    wait_for_records,
    wait_until,
)
from upstream import BASE, Stream, openai_chat_events, routes_config, tokens

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "stream": True, "messages": MESSAGES}
ROUTE = "inference.local"
KiB = 1024


# --- drain on SIGTERM ------------------------------------------------------------------------


def _read_stream(proxy) -> tuple[str, float, BaseException | None]:
    """Stream a chat completion raw; (text received, when it ended, the error that ended it, if any)."""
    text = ""
    try:
        with httpx_through(proxy) as http:
            with http.stream("POST", f"{BASE}/v1/chat/completions", json=CHAT) as response:
                assert response.status_code == 200
                for chunk in response.iter_text():
                    text += chunk
    except httpx.TransportError as e:
        return text, time.monotonic(), e
    return text, time.monotonic(), None


def _connect_while_draining(port: int) -> str:
    """What a new client gets from the draining proxy: "refused" (no listener) or the 503 it is answered."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionRefusedError:
        return "refused"
    with sock:
        sock.sendall(b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n\r\n")
        try:
            status, _, body = _recv_head(sock)
        except ConnectionResetError:
            # Accepted into the kernel's backlog just before the listener
            # closed: the kernel resets it, which is a refusal too.
            return "refused"
        return f"{status} {body.decode(errors='replace')}"


def test_sigterm_drains_a_stream_in_flight_then_exits(start_proxy, upstream):
    events = openai_chat_events(tokens(29))  # 30 events, 100 ms apart
    upstream.script = Stream(events=events, interval=0.1)
    proxy = start_proxy({**routes_config(upstream.url), "drain_timeout": 10})

    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(_read_stream, proxy)
        upstream.only()
        time.sleep(0.5)
        terminated = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        proxy.wait_for_log("draining: 1 busy connections")
        newcomer = _connect_while_draining(proxy.port)
        text, ended, error = reading.result(timeout=TIMEOUT)

    assert error is None, f"the stream in flight was cut: {error!r}"
    assert text == b"".join(events).decode(), "the stream in flight did not arrive complete"
    assert newcomer == "refused", newcomer
    status = proxy.process.wait(10 + 5)
    exited = time.monotonic()
    # navtwist replaces the reactor's SIGTERM handler: a drained stop is a normal
    # exit (0), not twistd re-raising the signal (-15, i.e. 143 from a shell).
    assert status == 0, status
    log = proxy.log_text()
    assert "drained" in log and "Server Shut Down." in log, log
    assert "drain timeout" not in log
    assert exited - ended < 2, f"twistd took {exited - ended:.1f} s to exit after the last stream ended"
    assert ended - terminated > 2, "the stream ended too early to have been drained"
    [record] = request_records(log)
    assert record["outcome"] == "ok"


def test_drain_timeout_ends_a_long_stream_with_an_error_event_and_exits(start_proxy, upstream):
    """A stream still running at the drain deadline is told in the stream that the
    proxy is shutting down, then ends with its chunked terminator (no reset), and
    the request is logged as a drain cut."""
    upstream.script = Stream(events=openai_chat_events(tokens(99)), interval=0.1)  # 100 events: 10 s
    proxy = start_proxy({**routes_config(upstream.url), "drain_timeout": 1})

    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(_read_stream, proxy)
        exchange = upstream.only()
        time.sleep(0.5)
        terminated = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        text, ended, error = reading.result(timeout=TIMEOUT)

    assert error is None, f"the cut stream did not end cleanly: {error!r}"
    assert 0.8 < ended - terminated < 2.5, f"cut {ended - terminated:.2f} s after SIGTERM"
    assert 5 < text.count("data: ") < 40
    assert "[DONE]" not in text
    cut = stream_error_event("openai_chat_completions", "response truncated: the proxy is shutting down").decode()
    assert text.endswith(cut), text[-300:]
    assert proxy.process.wait(1 + 5) == 0
    log = proxy.log_text()
    assert "drain timeout: closing 1 " in log and "Server Shut Down." in log, log
    exchange.wait(3)
    assert exchange.peer_closed_at is not None and not exchange.completed
    # The proxy cut the stream: the request log says so, and blames neither the upstream nor the client.
    [record] = request_records(log)
    assert (record["outcome"], record["detail"]) == ("drain_cut", "drain_cut"), record


def _fill_until_the_kernel_is_full(feed, exchange, event: bytes, proxy, client_port: int, upstream_port: int) -> int:
    """Feed events until the proxy's socket to the client takes no more (the client
    reads nothing), then one more: the last ones wait in the proxy's own buffer, which
    stays under Twisted's 64 KiB pause threshold.  Returns how many were sent."""
    sent = stalled = 0
    queued = tcp_queues(proxy.port, client_port)[0]
    deadline = time.monotonic() + TIMEOUT
    while stalled < 2:
        feed.put(event)
        sent += 1
        while exchange.bytes_sent < sent * len(event) or tcp_queues(remote_port=upstream_port)[1]:
            assert time.monotonic() < deadline, "the proxy stopped reading the upstream"
            time.sleep(0.002)  # until the proxy has read the event
        time.sleep(0.02)  # and written what the kernel takes
        now = tcp_queues(proxy.port, client_port)[0]
        stalled = stalled + 1 if now <= queued else 0
        queued = now
        assert time.monotonic() < deadline, "the proxy's socket never filled up"
    feed.put(event)
    return sent + 1


def test_drain_delivers_the_tail_a_slow_reader_has_not_read_yet(start_proxy, upstream):
    """A response the proxy has finished relaying, but whose tail still waits in the
    proxy's own buffer for a slow client, is work in flight: drain must deliver it.

    (A regression test: the drain used to end as soon as no request was open, and
    twistd's shutdown then dropped that buffer.)"""
    feed: queue.Queue[bytes | None] = queue.Queue()
    upstream.script = Fed(feed=feed)
    proxy = start_proxy({**routes_config(upstream.url), "drain_timeout": 10})
    tunnel = NarrowTunnel(proxy)  # a client that reads nothing for now
    event = b"data: " + b"x" * (16 * KiB) + b"\n\n"
    try:
        tunnel.request("POST", "/v1/chat/completions", CHAT)
        assert tunnel.read_head()[0] == 200
        sent = _fill_until_the_kernel_is_full(feed, upstream.only(), event, proxy,
                                              tunnel.sock.getsockname()[1], upstream.port)
        feed.put(None)  # the end: the proxy finishes the response
        wait_for_records(proxy, 1)  # the proxy has finished the response

        proxy.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        received = b""
        try:
            while chunk := tunnel.recv():
                received += chunk
        except (ConnectionError, ssl.SSLError):
            pass
    finally:
        feed.put(None)
        tunnel.close()

    assert proxy.process.wait(10 + 5) == 0
    assert received.count(b"data: ") == sent and received.endswith(b"0\r\n\r\n"), (
        f"{received.count(b'data: ')} of {sent} events; tail {received[-12:]!r}")
    assert "drained" in proxy.log_text()


# --- the admin endpoint -------------------------------------------------------------------------


class Admin:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=TIMEOUT, trust_env=False)

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        response = self.get("/metrics")
        assert response.status_code == 200
        return metric_samples(response.text)


def _wait_serving(admin: Admin) -> None:
    def up() -> bool:
        try:
            return admin.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, "the admin endpoint answers /healthz")


def test_metrics_move_with_traffic(start_proxy, upstream):
    admin_port = _free_port()
    proxy = start_proxy({**routes_config(upstream.url), "admin_listen": f"tcp:{admin_port}:interface=127.0.0.1"})
    admin = Admin(admin_port)
    _wait_serving(admin)
    assert admin.get("/readyz").status_code == 200
    assert admin.get("/readyz").json()["status"] == "ready"
    before = admin.samples()
    assert metric_value(before, "navtwist_requests_total") == 0
    assert metric_value(before, "navtwist_active_streams") == 0

    # Raw streams read to their very end (the SDK closes at [DONE], sometimes before
    # the chunked terminator has passed the proxy, which then counts client_gone).
    events = openai_events_with_usage(["a ", "b"], 11, 22)
    upstream.script = Stream(events=events)
    for _ in range(2):
        text, _, error = _read_stream(proxy)
        assert error is None and text == b"".join(events).decode()
    with httpx_through(proxy) as http:
        assert http.get(f"{BASE}/v1/files").status_code == 403  # not an inference path: refused
    wait_for_records(proxy, 2)

    samples = admin.samples()
    assert metric_value(samples, "navtwist_requests_total", route=ROUTE, status="200", outcome="ok") == 2
    assert metric_value(samples, "navtwist_requests_total", status="200") == 2
    assert metric_value(samples, "navtwist_time_to_first_token_seconds_count", route=ROUTE) == 2
    assert metric_value(samples, "navtwist_request_duration_seconds_count", route=ROUTE) == 2
    assert metric_value(samples, "navtwist_tokens_total", route=ROUTE, direction="input") == 22
    assert metric_value(samples, "navtwist_tokens_total", route=ROUTE, direction="output") == 44
    assert metric_value(samples, "navtwist_bytes_relayed_total", kind="inference") > 0
    assert metric_value(samples, "navtwist_active_streams") == 0

    # A stream in flight is active, and is no longer once it ends.
    upstream.script = Stream(events=openai_chat_events(tokens(8)), interval=0.1)
    with httpx_through(proxy) as http:
        with http.stream("POST", f"{BASE}/v1/chat/completions", json=CHAT) as response:
            chunks = response.iter_text()  # kept: a discarded iterator closes the response
            next(chunks)
            assert metric_value(admin.samples(), "navtwist_active_streams") == 1
            assert "".join(chunks).endswith("data: [DONE]\n\n")
    wait_for_records(proxy, 3)
    assert metric_value(admin.samples(), "navtwist_active_streams") == 0

    # A CONNECT the policy denies is counted as such.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"CONNECT denied.example:443 HTTP/1.1\r\nHost: denied.example:443\r\n\r\n")
        status, head, _ = _recv_head(sock)
    assert status == 403, head
    samples = admin.samples()
    assert metric_value(samples, "navtwist_tunnel_connections_total", decision="policy_denied") == 1
    assert metric_value(samples, "navtwist_tunnel_connections_total", decision="allowed") == 0
    assert metric_value(samples, "navtwist_requests_total", status="200", outcome="ok") == 3


# --- plugins ----------------------------------------------------------------------------------


def test_plugins_cap_max_tokens_and_audit_each_response(start_proxy, upstream, monkeypatch):
    monkeypatch.setenv("NAVTWIST_MAX_TOKENS", "100")  # start_proxy passes its environment to twistd
    proxy = start_proxy({**routes_config(upstream.url), "plugins": ["cap_max_tokens", "stream_audit"]})
    upstream.script = Stream(events=openai_events_with_usage(["secret-answer-part"], 5, 7))

    with openai_through(proxy) as client:
        list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "secret-question"}],
                                            stream=True, max_tokens=500))
        list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True, max_tokens=50))

    capped, untouched = upstream.wait_for(2)
    assert capped.json()["max_tokens"] == 100
    assert untouched.json()["max_tokens"] == 50
    wait_for_records(proxy, 2)
    log = proxy.wait_for_log("[navtwist.audit#info] audit ")
    audits = [line for line in log.splitlines() if "[navtwist.audit#info] audit " in line]
    assert len(audits) == 2, audits
    assert "protocol=openai_chat_completions" in audits[0] and "input_tokens=5" in audits[0], audits[0]
    assert "output_tokens=7" in audits[0] and "chunks=" in audits[0], audits[0]
    assert "secret-question" not in log and "secret-answer-part" not in log


def test_an_unknown_plugin_stops_start_up(tmp_path, upstream):
    result = run_twistd({**routes_config(upstream.url), "plugins": ["nope"]}, tmp_path)

    assert result.returncode != 0
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "plugins[0]" in line]
    assert len(errors) == 1, output
    assert "no plugin named 'nope' is installed" in errors[0], errors[0]
    assert "Traceback" not in output


# --- drain: idle connections close at once ----------------------------------------------------


def _idle_tls_client(proxy, host: str) -> ssl.SSLSocket:
    """A client through CONNECT + our TLS that made one request and now idles on keep-alive."""
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    status, head, _ = _recv_head(raw)
    assert status == 200, head
    tls = ssl.create_default_context(cafile=str(proxy.ca_path)).wrap_socket(raw, server_hostname=host)
    tls.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    status, head, _ = _recv_head(tls)
    assert status == 200 and b"connection: close" not in head.lower(), head
    return tls


def test_sigterm_with_only_idle_clients_exits_at_once(start_proxy, upstream):
    """Idle keep-alive connections (inside our TLS, forwarded, and one that sent nothing)
    are closed at once: the stop does not wait out drain_timeout."""
    proxy = start_proxy({**routes_config(upstream.url), "drain_timeout": 10,
                         "policy": {"allow": [f"127.0.0.1:{upstream.port}"],
                                    "intercept": [{"host": "api.example.test", "inference": True}]}})
    clients: list[socket.socket] = [_idle_tls_client(proxy, ROUTE), _idle_tls_client(proxy, "api.example.test")]
    forward = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    forward.sendall(f"GET {upstream.url}/models HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n\r\n".encode())
    _recv_head(forward)
    clients += [forward, socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)]
    time.sleep(0.2)
    try:
        terminated = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(10 + 5) == 0
        exited = time.monotonic()
    finally:
        for client in clients:
            client.close()
    assert exited - terminated < 1.0, f"twistd took {exited - terminated:.1f} s to stop with only idle clients"
    assert "drain timeout" not in proxy.log_text()


def test_readyz_is_503_while_draining_and_the_response_in_flight_is_the_connections_last(start_proxy, upstream):
    admin_port = _free_port()
    upstream.script = Stream(events=openai_chat_events(tokens(19)), interval=0.1)  # 2 s
    proxy = start_proxy({**routes_config(upstream.url), "drain_timeout": 10,
                         "admin_listen": f"tcp:{admin_port}:interface=127.0.0.1"})
    admin = Admin(admin_port)
    _wait_serving(admin)
    tunnel = Tunnel(proxy)
    try:
        tunnel.request("POST", "/v1/chat/completions", CHAT)
        upstream.only()
        proxy.process.send_signal(signal.SIGTERM)
        proxy.wait_for_log("draining: 1 busy connections")
        ready = admin.get("/readyz")
        status, head = tunnel.read_head()
        body = tunnel.read_until(lambda data: data.endswith(b"0\r\n\r\n"))
        closed = tunnel.recv() == b""  # the connection closes after its last response
    finally:
        tunnel.close()
    assert ready.status_code == 503 and ready.json()["checks"]["listener_bound"] is False, ready.text
    assert status == 200 and b"[DONE]" in body and closed
    assert proxy.process.wait(10 + 5) == 0
