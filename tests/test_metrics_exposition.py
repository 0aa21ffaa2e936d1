"""What /metrics exposes beyond the series navtwist defines."""
from __future__ import annotations

from navtwist.service.metrics import Metrics


def test_no_created_series() -> None:
    # prometheus_client adds a *_created series (a timestamp) per counter and
    # histogram child by default: twice the series, no information for navtwist.
    metrics = Metrics(["r"])
    metrics.request_finished({"route": "r", "protocol": "openai_chat_completions", "status": 200, "outcome": "ok",
                              "ttft_ms": 5, "duration_ms": 9, "bytes": 10})
    text = metrics.render().decode()
    assert "navtwist_requests_total{" in text and "navtwist_time_to_first_token_seconds_bucket{" in text
    assert "_created" not in text
