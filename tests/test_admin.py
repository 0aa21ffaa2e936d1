"""The admin endpoint: health, readiness, metrics, and what it refuses."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.web.server import Site

from navtwist.service.admin import make_admin_site
from navtwist.service.metrics import Metrics

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Response:
    """One HTTP/1.1 response parsed from the bytes a channel wrote."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ")[1])
        self.headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


@pytest.fixture
def checks() -> dict[str, bool]:
    return {"config_loaded": True, "listener_bound": True, "ca_ready": True}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(["main"])


@pytest.fixture
def site(metrics: Metrics, checks: dict[str, bool]) -> Site:
    return make_admin_site(metrics, lambda: checks, MemoryReactorClock())


def call(site: Site, method: str, path: str) -> Response:
    """Send one request through a real HTTP channel of C{site} and parse its answer."""
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(f"{method} {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode("ascii"))
    return Response(transport.value())


def test_healthz_says_ok(site: Site) -> None:
    response = call(site, "GET", "/healthz")
    assert response.status == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["cache-control"] == "no-store"


def test_server_header_is_navtwist_without_a_version(site: Site) -> None:
    assert call(site, "GET", "/healthz").headers["server"] == "navtwist"


def test_readyz_follows_the_checks(site: Site, checks: dict[str, bool]) -> None:
    ready = call(site, "GET", "/readyz")
    assert ready.status == 200
    assert ready.json() == {"status": "ready", "checks": checks}
    checks["ca_ready"] = False
    not_ready = call(site, "GET", "/readyz")
    assert not_ready.status == 503
    assert not_ready.json() == {
        "status": "not_ready",
        "checks": {"config_loaded": True, "listener_bound": True, "ca_ready": False},
    }
    checks["ca_ready"] = True
    assert call(site, "GET", "/readyz").status == 200


def test_readyz_is_not_ready_when_the_checks_raise(metrics: Metrics) -> None:
    def broken() -> dict[str, bool]:
        raise RuntimeError("config lock poisoned")

    site = make_admin_site(metrics, broken, MemoryReactorClock())
    with capturedLogs() as events:
        response = call(site, "GET", "/readyz")
    assert response.status == 503
    assert response.json() == {"status": "not_ready", "checks": {}}
    assert any("log_failure" in event for event in events)


def test_metrics_serves_the_exposition(site: Site, metrics: Metrics) -> None:
    metrics.stream_started()
    response = call(site, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"] == METRICS_TYPE
    assert response.body == metrics.render()
    assert b"navtwist_active_streams 1.0" in response.body


@pytest.mark.parametrize("path", ["/", "/metricsx", "/metrics/", "/healthz/extra", "/v1/chat/completions"])
def test_unknown_paths_are_json_404(site: Site, path: str) -> None:
    response = call(site, "GET", path)
    assert response.status == 404
    assert response.json() == {"error": "not_found"}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_other_methods_are_json_405(site: Site, method: str, path: str) -> None:
    response = call(site, method, path)
    assert response.status == 405
    assert response.json() == {"error": "method_not_allowed"}
    assert response.headers["allow"] == "GET, HEAD"


def test_head_is_get_without_a_body(site: Site) -> None:
    response = call(site, "HEAD", "/healthz")
    assert response.status == 200
    assert response.headers["content-length"] == str(len(b'{"status": "ok"}'))
    assert response.body == b""


def test_an_internal_error_hides_twisted_and_the_traceback(checks: dict[str, bool]) -> None:
    class Broken(Metrics):
        def render(self) -> bytes:
            raise RuntimeError("secret detail")

    site = make_admin_site(Broken(), lambda: checks, MemoryReactorClock())
    with capturedLogs():
        response = call(site, "GET", "/metrics")
    assert response.status == 500
    assert response.headers["server"] == "navtwist"
    assert b"secret detail" not in response.body


def test_starting_and_stopping_the_site_logs_nothing(site: Site) -> None:
    with capturedLogs() as events:
        site.doStart()
        site.doStop()
    assert [formatEvent(event) for event in events] == []


# --- over a real socket ----------------------------------------------------------------


@pytest.fixture
def served(metrics: Metrics, checks: dict[str, bool]) -> Iterator[str]:
    """An admin site on 127.0.0.1, run by a private reactor in a thread; yields its URL."""
    reactor = SelectReactor()
    port = reactor.listenTCP(0, make_admin_site(metrics, lambda: checks, reactor), interface="127.0.0.1")
    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port.getHost().port}"
    finally:
        reactor.callFromThread(reactor.stop)
        thread.join(10)
        assert not thread.is_alive()


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.headers["content-type"], answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read()


def test_over_a_socket_metrics_parse_and_nothing_is_access_logged(served: str, metrics: Metrics,
                                                                  checks: dict[str, bool]) -> None:
    metrics.request_finished({"route": "main", "protocol": "anthropic_messages", "status": 200, "outcome": "ok",
                              "duration_ms": 800.0, "bytes": 99})
    checks["listener_bound"] = False
    with capturedLogs() as events:
        status, content_type, body = fetch(f"{served}/metrics")
        ready_status, _, ready_body = fetch(f"{served}/readyz")
    assert (status, content_type) == (200, METRICS_TYPE)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    labels = (("outcome", "ok"), ("protocol", "anthropic_messages"), ("route", "main"), ("status", "200"))
    assert samples[("navtwist_requests_total", labels)] == 1
    assert samples[("navtwist_bytes_relayed_total", (("kind", "inference"),))] == 99
    assert ready_status == 503
    assert json.loads(ready_body)["checks"]["listener_bound"] is False
    logged = [formatEvent(event) for event in events]
    assert not [line for line in logged if "/metrics" in line or "/readyz" in line], logged
