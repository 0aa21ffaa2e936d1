"""The admin HTTP endpoint: liveness, readiness and Prometheus metrics.

It is meant for probes and scrapers, so every answer is small, JSON except
the metrics, and never cached; it writes no access log (a probe every few
seconds would drown the proxy's own log) and does not name Twisted's version.
"""
from __future__ import annotations

import json
from typing import Callable, Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web import http
from twisted.web.server import Request, Site

from navtwist.service.metrics import Metrics

log = Logger(namespace="navtwist.admin")

# What prometheus_client's own handler sends with generate_latest's output when
# the scraper asks for nothing newer; its CONTENT_TYPE_LATEST names version
# 1.0.0 in recent releases, which older Prometheus servers do not know.
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

SERVER = b"navtwist"
ALLOWED_METHODS = (b"GET", b"HEAD")  # HEAD is GET without the body: Twisted drops it
IDLE_TIMEOUT = 60  # seconds an idle keep-alive connection is kept; scrapers reconnect cheaply


class _AdminRequest(Request):
    """A request that names the server as navtwist on every response, error pages included."""

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self.responseHeaders.setRawHeaders(b"server", [SERVER])
        super().write(data)


class _AdminSite(Site):
    """A site that keeps quiet: no access log, no factory start and stop messages."""

    noisy = False
    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        pass


class AdminResource(Resource):
    """Answers every path itself, so that unknown ones get a JSON 404 too."""

    isLeaf = True

    def __init__(self, metrics: Metrics, readiness: Callable[[], Mapping[str, bool]]) -> None:
        super().__init__()
        self._metrics = metrics
        self._readiness = readiness
        self._pages: dict[bytes, Callable[[Request], bytes]] = {
            b"/healthz": self._healthz,
            b"/readyz": self._readyz,
            b"/metrics": self._render_metrics,
        }

    def render(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        page = self._pages.get(request.path)
        if page is None:
            return _json(request, 404, {"error": "not_found"})
        if request.method not in ALLOWED_METHODS:
            request.responseHeaders.setRawHeaders(b"allow", [b", ".join(ALLOWED_METHODS)])
            return _json(request, 405, {"error": "method_not_allowed"})
        return page(request)

    def _healthz(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok"})

    def _readyz(self, request: Request) -> bytes:
        """Ready when every check passes; a readiness callable that raises means not ready."""
        try:
            checks = {name: bool(passed) for name, passed in self._readiness().items()}
        except Exception:
            log.failure("readiness checks failed")
            return _json(request, 503, {"status": "not_ready", "checks": {}})
        if all(checks.values()):
            return _json(request, 200, {"status": "ready", "checks": checks})
        return _json(request, 503, {"status": "not_ready", "checks": checks})

    def _render_metrics(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [METRICS_CONTENT_TYPE])
        return self._metrics.render()


def _json(request: Request, status: int, document: dict) -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    return json.dumps(document).encode("utf-8")


def make_admin_site(
    metrics: Metrics, readiness: Callable[[], Mapping[str, bool]], reactor: IReactorTime
) -> Site:
    """The admin site; C{reactor} runs its connections' idle timeouts."""
    return _AdminSite(AdminResource(metrics, readiness), requestFactory=_AdminRequest, timeout=IDLE_TIMEOUT,
                      reactor=reactor)
