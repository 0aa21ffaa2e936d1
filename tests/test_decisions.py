"""The decision log: redaction, the structured event, the OCSF lines."""
from __future__ import annotations

import json
from pathlib import Path

from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from navtwist.decisions import DecisionLog, DecisionRecord, ocsf, redact_target


def test_query_values_are_redacted_names_kept() -> None:
    assert redact_target(b"/repos/a/b?access_token=ghp_x&per_page=5") == "/repos/a/b?access_token=REDACTED&per_page=REDACTED"
    assert redact_target(b"/plain") == "/plain"
    assert redact_target("/x?") == "/x"


def _request(**changes: object) -> DecisionRecord:
    fields = dict(kind="request", client="10.0.0.7:5123", host="api.github.com", port=443, decision="deny",
                  method="POST", path="/gists", entry="policy.intercept[0]", rule="rules[1]", reason="l7_denied",
                  status=403, duration_ms=1.5)
    fields.update(changes)
    return DecisionRecord(**fields)  # type: ignore[arg-type]


def test_ocsf_http_activity_for_a_denied_request() -> None:
    event = ocsf(_request(), now=1700000000.25)
    assert event["class_uid"] == 4002 and event["category_uid"] == 4
    assert event["activity_id"] == 6 and event["type_uid"] == 400206  # POST
    assert event["action"] == "Denied" and event["action_id"] == 2 and event["disposition"] == "Blocked"
    assert event["time"] == 1700000000250
    assert event["http_request"]["url"] == {"hostname": "api.github.com", "port": 443, "path": "/gists",
                                           "query_string": "", "scheme": "https"}
    assert event["http_response"] == {"code": 403}
    assert event["src_endpoint"] == {"ip": "10.0.0.7", "port": 5123}
    assert event["unmapped"]["rule"] == "rules[1]" and event["metadata"]["version"].startswith("1.")


def test_ocsf_network_activity_for_a_tunnel() -> None:
    record = DecisionRecord(kind="tunnel", client="127.0.0.1:9", host="pypi.org", port=443, decision="allow",
                            bytes_up=10, bytes_down=20, status=200)
    event = ocsf(record, now=0)
    assert event["class_uid"] == 4001 and event["activity_id"] == 1 and event["action"] == "Allowed"
    assert event["traffic"] == {"bytes_out": 10, "bytes_in": 20}


def test_would_deny_is_allowed_with_a_higher_severity() -> None:
    event = ocsf(_request(decision="would_deny", mode="audit", status=200), now=0)
    assert event["action"] == "Allowed" and event["severity_id"] == 2 and event["unmapped"]["mode"] == "audit"


def test_each_decision_is_one_event_and_one_audit_line(tmp_path: Path) -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    counted: list[tuple[str, str]] = []

    class Metrics:
        def decision(self, entry: str, decision: str) -> None:
            counted.append((entry, decision))

    path = tmp_path / "audit.jsonl"
    log = DecisionLog(str(path), Metrics())
    try:
        log.record(_request(credential="github"), now=5.0)
        log.record(_request(decision="allow", reason=None, status=200), now=6.0)
    finally:
        globalLogPublisher.removeObserver(events.append)
        log.close()
    decisions = [e for e in events if e.get("event") == "decision"]
    assert [e["decision"] for e in decisions] == ["deny", "allow"]
    assert decisions[0]["credential"] == "github" and "reason" not in decisions[1]
    # The text line names the credential too (twistd's log shows only the formatted text).
    assert formatEvent(decisions[0]).endswith(" credential=github")
    assert "credential" not in formatEvent(decisions[1])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["action"] for line in lines] == ["Denied", "Allowed"]
    assert counted == [("policy.intercept[0]", "deny"), ("policy.intercept[0]", "allow")]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
