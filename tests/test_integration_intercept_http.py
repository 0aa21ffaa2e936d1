"""Absolute-form C{http://} requests to a host listed in C{policy.intercept} get the entry's rules.

Without this, plain HTTP to an intercepted host would either bypass the rules
or be refused as not allowed; it must be judged like a request inside the
host's TLS: denied → 403 C{l7_denied} with the reason, allowed → forwarded.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import pytest

from conftest import Proxy, ProxyStarter
from egress_servers import Conn, HttpServer

pytestmark = pytest.mark.integration

MOCK_ROUTES = [{"name": "inference.local", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}]


def _entry(port: int) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "access": "read-only", "deny_reason": "ask the operator",
            "rules": [{"deny": {"method": "*", "path": "/secret/**"}}]}


@pytest.fixture
def origin() -> Iterator[HttpServer]:
    server = HttpServer().start()
    yield server
    server.stop()


def _send(proxy: Proxy, raw: bytes) -> Any:
    with Conn.open(proxy.port) as conn:
        conn.send(raw)
        return conn.response()


def test_denied_method_on_port_80_gets_the_l7_denied_403(start_proxy: ProxyStarter) -> None:
    proxy = start_proxy({"routes": MOCK_ROUTES, "policy": {"intercept": [_entry(80)]}})
    response = _send(proxy, b"POST http://127.0.0.1/gists?token=s3cret HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Content-Length: 3\r\n\r\nx=1")
    assert response.status == 403 and response.headers["x-navtwist-error"] == "l7_denied"
    assert json.loads(response.body) == {"error": "l7_denied", "reason": "ask the operator",
                                         "detail": "POST 127.0.0.1/gists not permitted by policy"}
    log = proxy.wait_for_log("decision deny request 127.0.0.1:80 POST /gists?token=REDACTED (l7_denied)")
    assert "s3cret" not in log


def test_allowed_request_is_forwarded_and_a_denied_one_never_reaches_the_origin(
    start_proxy: ProxyStarter, origin: HttpServer
) -> None:
    proxy = start_proxy({"routes": MOCK_ROUTES, "policy": {"intercept": [_entry(origin.port)]}})
    base = f"http://127.0.0.1:{origin.port}"
    with Conn.open(proxy.port) as conn:
        conn.send(f"GET {base}/secret/key HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
        denied = conn.response()
        assert denied.status == 403 and denied.json()["error"] == "l7_denied"
        conn.send(f"GET {base}/repos/x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
        allowed = conn.response()
        assert allowed.status == 200 and allowed.json()["path"] == "/repos/x?a=1"
    assert origin.paths() == ["/repos/x?a=1"]
    assert origin.seen[0].header("host") == [f"127.0.0.1:{origin.port}"]
    proxy.wait_for_log(f"decision allow request 127.0.0.1:{origin.port} GET /repos/x?a=REDACTED")


def test_audit_mode_forwards_a_would_be_denial(start_proxy: ProxyStarter, origin: HttpServer) -> None:
    proxy = start_proxy({"routes": MOCK_ROUTES, "policy": {"intercept": [{**_entry(origin.port), "mode": "audit"}]}})
    response = _send(proxy, f"DELETE http://127.0.0.1:{origin.port}/secret/x HTTP/1.1\r\n"
                            f"Host: 127.0.0.1:{origin.port}\r\n\r\n".encode())
    assert response.status == 200
    assert origin.paths() == ["/secret/x"]
    proxy.wait_for_log("decision would_deny request")
