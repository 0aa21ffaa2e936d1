"""Prometheus metrics: which series each event moves, and that labels stay bounded."""
from __future__ import annotations

from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import capturedLogs

from navtwist.outcome import Outcome
from navtwist.service.metrics import Metrics, status_label

CHAT = "openai_chat_completions"


def record(**changes: Any) -> dict[str, Any]:
    """An inference exchange's record as navtwist.upstream.exchange.request_record writes it."""
    base = {
        "protocol": CHAT, "client_model": "gpt-x", "route": "main", "upstream_model": "llama",
        "candidates_tried": 1, "status": 200, "outcome": "ok", "detail": "ok", "headers_ms": 120.0,
        "duration_ms": 2500.0, "bytes": 1234, "ttft_ms": 300.0, "input_tokens": 10, "output_tokens": 20,
    }
    return {**base, **changes}


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def requests(metrics: Metrics, route: str = "main", protocol: str = CHAT, status: str = "200",
             outcome: str = "ok") -> float | None:
    return sample(metrics, "navtwist_requests_total", route=route, protocol=protocol, status=status, outcome=outcome)


def total(metrics: Metrics, name: str) -> float:
    """The sum of every sample named C{name}, whatever its labels."""
    return sum(s.value for family in metrics.registry.collect() for s in family.samples if s.name == name)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(["main", "backup"])


def test_a_finished_request_is_counted_with_its_bytes_and_tokens(metrics: Metrics) -> None:
    metrics.request_finished(record())
    metrics.request_finished(record(input_tokens=5, output_tokens=None))
    assert requests(metrics) == 2
    assert sample(metrics, "navtwist_bytes_relayed_total", kind="inference") == 2468
    assert sample(metrics, "navtwist_tokens_total", route="main", direction="input") == 15
    assert sample(metrics, "navtwist_tokens_total", route="main", direction="output") == 20


def test_histograms_observe_milliseconds_as_seconds(metrics: Metrics) -> None:
    metrics.request_finished(record(ttft_ms=300.0, duration_ms=2500.0))
    ttft = "navtwist_time_to_first_token_seconds"
    assert sample(metrics, f"{ttft}_sum", route="main") == pytest.approx(0.3)
    assert sample(metrics, f"{ttft}_bucket", route="main", le="0.25") == 0
    assert sample(metrics, f"{ttft}_bucket", route="main", le="0.5") == 1
    duration = "navtwist_request_duration_seconds"
    assert sample(metrics, f"{duration}_sum", route="main") == pytest.approx(2.5)
    assert sample(metrics, f"{duration}_bucket", route="main", le="1.0") == 0
    assert sample(metrics, f"{duration}_bucket", route="main", le="2.5") == 1


def test_histogram_buckets_span_llm_latencies(metrics: Metrics) -> None:
    metrics.request_finished(record(ttft_ms=100_000.0, duration_ms=1_700_000.0))
    assert sample(metrics, "navtwist_time_to_first_token_seconds_bucket", route="main", le="120.0") == 1
    assert sample(metrics, "navtwist_time_to_first_token_seconds_bucket", route="main", le="90.0") == 0
    assert sample(metrics, "navtwist_request_duration_seconds_bucket", route="main", le="1800.0") == 1
    assert sample(metrics, "navtwist_request_duration_seconds_bucket", route="main", le="1200.0") == 0


def test_client_chosen_strings_never_become_labels(metrics: Metrics) -> None:
    metrics.request_finished(record(route="/v1/evil?x=1", protocol="made_up", outcome="surprise", status=200))
    assert requests(metrics, route="other", protocol="other", outcome="other") == 1
    text = metrics.render().decode()
    for raw in ("evil", "made_up", "surprise", "gpt-x", "llama"):
        assert raw not in text


@pytest.mark.parametrize(
    ("status", "label"),
    [
        (200, "200"), (429, "429"), (431, "431"), (504, "504"), (201, "2xx"), (304, "3xx"),
        (418, "4xx"), (599, "5xx"), (99, "other"), (600, "other"), (None, "other"), (True, "other"),
        ("200", "other"),
    ],
)
def test_status_labels_are_known_codes_or_classes(status: object, label: str) -> None:
    assert status_label(status) == label


def test_status_and_outcome_of_an_exchange_failure(metrics: Metrics) -> None:
    metrics.request_finished(record(status=503, outcome="upstream_error", detail="upstream_unavailable", ttft_ms=None))
    metrics.request_finished(record(status=429, outcome="rejected", detail="route_busy", ttft_ms=None))
    metrics.request_finished(record(status=207, outcome="timeout", detail="upstream_idle_timeout"))
    metrics.request_finished(record(status=500, outcome="upstream_status", detail="upstream_status"))
    assert requests(metrics, status="503", outcome="upstream_error") == 1
    assert requests(metrics, status="429", outcome="rejected") == 1
    assert requests(metrics, status="2xx", outcome="timeout") == 1
    assert requests(metrics, status="500", outcome="upstream_status") == 1


@pytest.mark.parametrize("outcome", sorted(o.value for o in Outcome))
def test_outcome_labels_are_the_categories(metrics: Metrics, outcome: str) -> None:
    """A record's outcome is a category; a detail in its place is not a label value."""
    metrics.request_finished(record(outcome=outcome))
    category = Outcome(outcome).category.value
    assert requests(metrics, outcome=category if category == outcome else "other") == 1


def test_oversized_events_are_counted_per_route(metrics: Metrics) -> None:
    metrics.request_finished(record(oversized_events=2))
    metrics.request_finished(record(oversized_events=0))
    metrics.request_finished(record())
    assert sample(metrics, "navtwist_oversized_events_total", route="main") == 2


@pytest.mark.parametrize("bad", [{key: None for key in record()}, {}])
def test_a_record_without_values_is_counted_as_other(metrics: Metrics, bad: dict[str, Any]) -> None:
    metrics.request_finished(bad)
    assert requests(metrics, route="other", protocol="other", status="other", outcome="other") == 1
    assert total(metrics, "navtwist_time_to_first_token_seconds_count") == 0
    assert total(metrics, "navtwist_request_duration_seconds_count") == 0
    assert total(metrics, "navtwist_tokens_total") == 0
    assert total(metrics, "navtwist_bytes_relayed_total") == 0


def test_nonsense_amounts_are_skipped_but_the_request_counts(metrics: Metrics) -> None:
    metrics.request_finished(record(bytes=-5, ttft_ms="300", duration_ms=float("nan"), input_tokens=True,
                                    output_tokens=float("inf")))
    assert requests(metrics) == 1
    assert total(metrics, "navtwist_bytes_relayed_total") == 0
    assert total(metrics, "navtwist_time_to_first_token_seconds_count") == 0
    assert total(metrics, "navtwist_request_duration_seconds_count") == 0
    assert total(metrics, "navtwist_tokens_total") == 0


def test_forwarded_requests_have_their_own_counter(metrics: Metrics) -> None:
    metrics.request_finished({"forward": "example.com:80", "candidates_tried": 1, "status": 502,
                              "outcome": "upstream_error", "detail": "upstream_unreachable", "headers_ms": None,
                              "duration_ms": 12.0, "bytes": 0})
    metrics.request_finished({"forward": "example.com:80", "status": 200, "outcome": "ok", "bytes": 50})
    assert sample(metrics, "navtwist_forward_requests_total", status="502", outcome="upstream_error") == 1
    assert sample(metrics, "navtwist_forward_requests_total", status="200", outcome="ok") == 1
    assert sample(metrics, "navtwist_bytes_relayed_total", kind="forward") == 50
    assert sample(metrics, "navtwist_bytes_relayed_total", kind="inference") == 0
    assert total(metrics, "navtwist_requests_total") == 0
    assert total(metrics, "navtwist_request_duration_seconds_count") == 0


def test_set_routes_changes_which_routes_are_labelled() -> None:
    metrics = Metrics(["a"])
    metrics.request_finished(record(route="b"))
    metrics.set_routes(["b"])
    metrics.request_finished(record(route="b"))
    metrics.request_finished(record(route="a"))
    assert requests(metrics, route="other") == 2
    assert requests(metrics, route="b") == 1
    assert requests(metrics, route="a") is None


def test_active_streams_go_up_and_down(metrics: Metrics) -> None:
    metrics.stream_started()
    metrics.stream_started()
    metrics.stream_ended()
    assert sample(metrics, "navtwist_active_streams") == 1
    metrics.stream_ended()
    assert sample(metrics, "navtwist_active_streams") == 0


@pytest.mark.parametrize(
    ("decision", "label"),
    [("allowed", "allowed"), ("policy_denied", "policy_denied"), ("ssrf_denied", "ssrf_denied"),
     ("failed", "failed"), ("evil.example:443", "other"), (None, "other")],
)
def test_tunnel_decisions(metrics: Metrics, decision: Any, label: str) -> None:
    metrics.tunnel_decision(decision)
    assert sample(metrics, "navtwist_tunnel_connections_total", decision=label) == 1
    assert total(metrics, "navtwist_tunnel_connections_total") == 1


def test_tunnel_bytes_add_up_each_way(metrics: Metrics) -> None:
    metrics.tunnel_bytes(10, 200)
    metrics.tunnel_bytes(5, 0)
    assert sample(metrics, "navtwist_bytes_relayed_total", kind="tunnel_up") == 15
    assert sample(metrics, "navtwist_bytes_relayed_total", kind="tunnel_down") == 200


@pytest.mark.parametrize(
    ("kind", "label"),
    [("connect", "connect"), ("timeout", "timeout"), ("tls", "tls"), ("protocol", "protocol"),
     ("status", "status"), ("ECONNRESET from 10.0.0.1", "other")],
)
def test_upstream_errors(metrics: Metrics, kind: str, label: str) -> None:
    metrics.upstream_error(kind)
    assert sample(metrics, "navtwist_upstream_errors_total", kind=label) == 1
    assert total(metrics, "navtwist_upstream_errors_total") == 1


def test_fixed_label_series_exist_before_their_first_event(metrics: Metrics) -> None:
    for decision in ("allowed", "policy_denied", "ssrf_denied", "failed", "other"):
        assert sample(metrics, "navtwist_tunnel_connections_total", decision=decision) == 0
    for kind in ("connect", "timeout", "tls", "protocol", "status", "other"):
        assert sample(metrics, "navtwist_upstream_errors_total", kind=kind) == 0
    for kind in ("inference", "forward", "tunnel_up", "tunnel_down"):
        assert sample(metrics, "navtwist_bytes_relayed_total", kind=kind) == 0
    for operation in ("connect", "accept"):
        assert sample(metrics, "navtwist_fd_exhausted_total", operation=operation) == 0


def test_an_update_that_fails_is_swallowed_and_logged_once(metrics: Metrics) -> None:
    with capturedLogs() as events:
        metrics.request_finished(None)  # type: ignore[arg-type]
        metrics.request_finished(None)  # type: ignore[arg-type]
        metrics.tunnel_bytes("10", 0)  # type: ignore[arg-type]
    failures = [event for event in events if "log_failure" in event]
    assert [event["method"] for event in failures] == ["request_finished"]
    metrics.request_finished(record())
    assert requests(metrics) == 1


def test_render_is_parseable_exposition(metrics: Metrics) -> None:
    metrics.request_finished(record())
    metrics.stream_started()
    families = {family.name: family for family in text_string_to_metric_families(metrics.render().decode())}
    types = {name: family.type for name, family in families.items() if not name.endswith("_created")}
    assert types == {
        "navtwist_requests": "counter",
        "navtwist_time_to_first_token_seconds": "histogram",
        "navtwist_request_duration_seconds": "histogram",
        "navtwist_tokens": "counter",
        "navtwist_active_streams": "gauge",
        "navtwist_bytes_relayed": "counter",
        "navtwist_tunnel_connections": "counter",
        "navtwist_upstream_errors": "counter",
        "navtwist_forward_requests": "counter",
        "navtwist_decisions": "counter",
        "navtwist_oversized_events": "counter",
        "navtwist_fd_exhausted": "counter",
    }
    [served] = [s for s in families["navtwist_requests"].samples if s.name == "navtwist_requests_total"]
    assert served.labels == {"route": "main", "protocol": CHAT, "status": "200", "outcome": "ok"}
    assert served.value == 1


def test_instances_have_private_registries() -> None:
    first, second = Metrics(["main"]), Metrics(["main"])
    first.request_finished(record())
    assert requests(first) == 1
    assert requests(second) is None
    assert prometheus_client.REGISTRY.get_sample_value("navtwist_active_streams") is None


def test_a_given_registry_is_used() -> None:
    registry = CollectorRegistry()
    Metrics(registry=registry).stream_started()
    assert registry.get_sample_value("navtwist_active_streams") == 1


def test_decisions_are_counted_by_entry_and_verdict_with_bounded_labels(metrics: Metrics) -> None:
    metrics.decision("policy.intercept[2]", "would_deny")
    metrics.decision("policy.allow", "deny")
    metrics.decision("attacker-chosen-host.example", "maybe")
    assert sample(metrics, "navtwist_decisions_total", entry="policy.intercept[2]", decision="would_deny") == 1
    assert sample(metrics, "navtwist_decisions_total", entry="policy.allow", decision="deny") == 1
    assert sample(metrics, "navtwist_decisions_total", entry="other", decision="other") == 1
