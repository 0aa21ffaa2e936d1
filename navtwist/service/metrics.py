"""Prometheus metrics for the proxy, labelled only with values from fixed sets.

A request's path, host and model are the client's to choose: one series per
such string would let a sandbox grow the proxy's memory and the Prometheus
server's without bound.  So every label value is taken from a set known in
advance (configured route names, known protocols, status codes, outcomes)
and anything else is counted as C{other} or as its status class.

Metrics are a side matter: an update that fails must never break the request
it measures, so the update methods swallow their errors and log the first
one of each method.
"""
from __future__ import annotations

import functools
import re
import math
from typing import Any, Callable, Concatenate, Iterable, Mapping, ParamSpec

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from twisted.logger import Logger

from navtwist.decisions import DECISIONS
from navtwist.inference.protocols import PROTOCOLS
from navtwist.outcome import CATEGORIES
from navtwist.upstream.failures import UPSTREAM_ERROR_KINDS

log = Logger(namespace="navtwist.metrics")

OTHER = "other"

# Time to first token: from a fast cached answer to a long reasoning prefill.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120)
# Whole requests: from a model list to a half-hour agent turn.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1200, 1800)

# Statuses labelled by their code; others by their class.
STATUS_CODES = frozenset({200, 400, 401, 403, 404, 408, 413, 429, 431, 500, 502, 503, 504})

# A request record's outcome is one of these categories (its detail, unbounded, is never a label).
OUTCOMES = CATEGORIES

# Config entries that decide: policy.allow, policy.intercept[N], none.
_ENTRY = re.compile(r"policy\.allow|policy\.intercept\[\d{1,4}\]|none")

TUNNEL_DECISIONS = ("allowed", "policy_denied", "ssrf_denied", "failed", OTHER)
BYTE_KINDS = ("inference", "forward", "tunnel_up", "tunnel_down")
FD_OPERATIONS = ("connect", "accept")

P = ParamSpec("P")


def _guarded(method: Callable[Concatenate[Metrics, P], None]) -> Callable[Concatenate[Metrics, P], None]:
    """Keeps a metrics failure out of the request being measured; logs its first occurrence."""

    @functools.wraps(method)
    def guarded(self: Metrics, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception:
            if method.__name__ not in self._failed:
                self._failed.add(method.__name__)
                log.failure("metrics update {method} failed; later failures of it are not logged",
                            method=method.__name__)

    return guarded


def _label(value: object, known: Iterable[str]) -> str:
    """C{value} if it is one of C{known}, else C{other}."""
    return value if isinstance(value, str) and value in known else OTHER


def status_label(status: object) -> str:
    """A status code from L{STATUS_CODES}, else its class (C{4xx}), else C{other}."""
    if not isinstance(status, int) or isinstance(status, bool):
        return OTHER
    if status in STATUS_CODES:
        return str(status)
    return f"{status // 100}xx" if 100 <= status <= 599 else OTHER


def _amount(value: object) -> float | None:
    """A count or duration from a record, or None if it is missing or makes no sense."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) and value >= 0 else None


class Metrics:
    """The proxy's metrics in a registry of their own, so that instances never collide."""

    def __init__(self, route_names: Iterable[str] = (), registry: CollectorRegistry | None = None) -> None:
        # No *_created series (a start timestamp per counter and histogram
        # child): they double the series and tell nothing a restart does not.
        # The switch is process-wide in prometheus_client.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._failed: set[str] = set()
        self._routes: frozenset[str] = frozenset()
        self.set_routes(route_names)
        reg = self.registry
        self._requests = Counter(
            "navtwist_requests_total", "Inference requests answered, by how they ended.",
            ("route", "protocol", "status", "outcome"), registry=reg,
        )
        self._ttft = Histogram(
            "navtwist_time_to_first_token_seconds", "Time from the request to the first content token.",
            ("route",), buckets=TTFT_BUCKETS, registry=reg,
        )
        self._duration = Histogram(
            "navtwist_request_duration_seconds", "Time from the request to the end of its answer.",
            ("route",), buckets=DURATION_BUCKETS, registry=reg,
        )
        self._tokens = Counter(
            "navtwist_tokens_total", "Tokens reported by upstream usage.", ("route", "direction"), registry=reg,
        )
        self._decisions = Counter(
            "navtwist_decisions_total", "Egress decisions, by the config entry that decided and the verdict.",
            ("entry", "decision"), registry=reg,
        )
        self._oversized = Counter(
            "navtwist_oversized_events_total",
            "Stream events longer than the usage meter reads, skipped unread: usage they carried is not counted.",
            ("route",), registry=reg,
        )
        self._active_streams = Gauge(
            "navtwist_active_streams", "Response bodies being relayed now.", registry=reg,
        )
        bytes_relayed = Counter(
            "navtwist_bytes_relayed_total", "Body bytes relayed to clients, and tunnel bytes each way.",
            ("kind",), registry=reg,
        )
        tunnels = Counter(
            "navtwist_tunnel_connections_total", "CONNECT tunnels, by the proxy's decision.",
            ("decision",), registry=reg,
        )
        upstream_errors = Counter(
            "navtwist_upstream_errors_total", "Failed upstream calls, by kind.", ("kind",), registry=reg,
        )
        fd_exhausted = Counter(
            "navtwist_fd_exhausted_total",
            "Sockets that could not be made for want of a file descriptor, by operation (connect, accept).",
            ("operation",), registry=reg,
        )
        self._forward_requests = Counter(
            "navtwist_forward_requests_total", "Forwarded http:// requests, by how they ended.",
            ("status", "outcome"), registry=reg,
        )
        # Children of the fixed-label metrics are made now: each series exists
        # (at 0) from the start, so rates and alerts see its first increase.
        self._bytes = {kind: bytes_relayed.labels(kind) for kind in BYTE_KINDS}
        self._tunnels = {decision: tunnels.labels(decision) for decision in TUNNEL_DECISIONS}
        self._upstream_errors = {kind: upstream_errors.labels(kind) for kind in UPSTREAM_ERROR_KINDS}
        self._fd_exhausted = {operation: fd_exhausted.labels(operation) for operation in FD_OPERATIONS}

    @_guarded
    def set_routes(self, route_names: Iterable[str]) -> None:
        """Take the route names of a (re)loaded config as the route label's values."""
        self._routes = frozenset(route_names)

    @_guarded
    def request_finished(self, record: Mapping[str, Any]) -> None:
        """Count one exchange from the record it logged; forwarded requests have a C{forward} key."""
        status = status_label(record.get("status"))
        outcome = _label(record.get("outcome"), OUTCOMES)
        if "forward" in record:
            self._forward_requests.labels(status, outcome).inc()
            self._add_bytes("forward", record.get("bytes"))
            return
        route = _label(record.get("route"), self._routes)
        self._requests.labels(route, _label(record.get("protocol"), PROTOCOLS), status, outcome).inc()
        self._add_bytes("inference", record.get("bytes"))
        for histogram, key in ((self._ttft, "ttft_ms"), (self._duration, "duration_ms")):
            ms = _amount(record.get(key))
            if ms is not None:
                histogram.labels(route).observe(ms / 1000)
        for direction in ("input", "output"):
            tokens = _amount(record.get(f"{direction}_tokens"))
            if tokens is not None:
                self._tokens.labels(route, direction).inc(tokens)
        oversized = _amount(record.get("oversized_events"))
        if oversized:
            self._oversized.labels(route).inc(oversized)

    @_guarded
    def stream_started(self) -> None:
        self._active_streams.inc()

    @_guarded
    def stream_ended(self) -> None:
        self._active_streams.dec()

    @_guarded
    def tunnel_decision(self, decision: str) -> None:
        self._tunnels[_label(decision, TUNNEL_DECISIONS)].inc()

    @_guarded
    def decision(self, entry: str, decision: str) -> None:
        """One egress decision; C{entry} is a config path (bounded by the config's size)."""
        entry = entry if _ENTRY.fullmatch(entry) else OTHER
        self._decisions.labels(entry, _label(decision, DECISIONS)).inc()

    @_guarded
    def tunnel_bytes(self, up: int, down: int) -> None:
        self._add_bytes("tunnel_up", up)
        self._add_bytes("tunnel_down", down)

    @_guarded
    def upstream_error(self, kind: str) -> None:
        self._upstream_errors[_label(kind, UPSTREAM_ERROR_KINDS)].inc()

    @_guarded
    def fd_exhausted(self, operation: str) -> None:
        self._fd_exhausted[_label(operation, FD_OPERATIONS)].inc()

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format (0.0.4)."""
        return generate_latest(self.registry)

    def _add_bytes(self, kind: str, value: object) -> None:
        amount = _amount(value)
        if amount:
            self._bytes[kind].inc(amount)
