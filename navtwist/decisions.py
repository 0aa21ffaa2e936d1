"""The decision log: one structured event per egress decision.

Every decision navtwist makes about traffic leaving a sandbox — a tunnel
allowed or denied, an SSRF refusal, an intercepted request allowed, denied
or (in audit mode) that would have been denied — is one C{decision} event
with the same fields, so an operator can query one stream.  With
C{audit_log}, the same decisions are also written as OCSF 1.3 JSON lines
(HTTP Activity for requests, Network Activity for tunnels) for SIEMs.

Query values are redacted before anything is logged: they carry tokens.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode

from twisted.logger import Logger

log = Logger(namespace="navtwist.decision")

ALLOW, DENY, WOULD_DENY = "allow", "deny", "would_deny"
DECISIONS = (ALLOW, DENY, WOULD_DENY)


def redact_target(target: bytes | str) -> str:
    """The path of C{target} with each query value replaced by C{REDACTED}."""
    text = target.decode("latin-1") if isinstance(target, bytes) else target
    path, sep, query = text.partition("?")
    if not sep:
        return path
    names = [(name, "REDACTED") for name, _ in parse_qsl(query, keep_blank_values=True)]
    return f"{path}?{urlencode(names)}" if names else path


@dataclass
class DecisionRecord:
    """One decision; C{kind} is C{request} (an intercepted or forwarded request) or C{tunnel}."""

    kind: str
    client: str
    host: str
    port: int
    decision: str  # allow, deny or would_deny
    mode: str = "enforce"  # enforce or audit
    method: str | None = None
    path: str | None = None  # query values redacted
    entry: str | None = None  # e.g. "policy.intercept[0]" or "policy.allow"
    rule: str | None = None  # e.g. "rules[1]", "access", "default"
    reason: str | None = None  # the refusal code when denied: policy_denied, ssrf_denied, l7_denied...
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: float | None = None
    credential: str | None = None  # the credential names injected, never a value

    def fields(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


class DecisionLog:
    """Writes each decision as a log event and, optionally, as an OCSF line to C{audit_log}."""

    def __init__(self, audit_log: str | None = None, metrics: Any = None) -> None:
        self._metrics = metrics
        self._path = audit_log
        self._file: IO[str] | None = None
        if audit_log is not None:
            self._file = _open_append(audit_log)

    def record(self, record: DecisionRecord, now: float) -> None:
        fields = record.fields()
        log.info(
            "decision {decision} {kind} {host}:{port}" + (" {method} {path}" if record.method else "")
            + " ({reason})" * (record.reason is not None)
            + " credential={credential}" * (record.credential is not None),  # the name, never a value
            event="decision",
            **fields,
        )
        if self._metrics is not None:
            self._metrics.decision(record.entry or "none", record.decision)
        if self._file is not None:
            self._file.write(json.dumps(ocsf(record, now), separators=(",", ":")) + "\n")
            self._file.flush()

    def finish(self, record: DecisionRecord, started: float, now: float) -> None:
        """Record C{record} with its duration from C{started}."""
        record.duration_ms = round((now - started) * 1000, 1)
        self.record(record, now)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class DecisionOnEnd:
    """An exchange listener that writes an allowed request's decision when the
    exchange ends, with its status and sizes, then tells C{inner} (metrics).

    A request the egress stage refused after all (its name resolved to an
    internal address, say) is recorded as denied, with the refusal's code.
    """

    def __init__(
        self, log: DecisionLog, clock: Any, record: DecisionRecord, started: float, body: object = None,
        inner: Any = None,
    ) -> None:
        self._log = log
        self._clock = clock
        self._record = record
        self._started = started
        self._body = body
        self._inner = inner

    def attempt_failed(self, failure: Any, timed_out: bool) -> None:
        if self._inner is not None:
            self._inner.attempt_failed(failure, timed_out)

    def ended(self, outcome: dict[str, Any]) -> None:
        decision = self._record
        decision.status = outcome.get("status")
        decision.bytes_down = int(outcome.get("bytes") or 0)
        decision.bytes_up = int(getattr(self._body, "received", 0))
        if outcome.get("outcome") == "rejected":
            decision.decision, decision.reason = DENY, outcome.get("detail")
            if decision.reason == "policy_denied":
                decision.entry = None
        self._log.finish(decision, self._started, self._clock.seconds())
        if self._inner is not None:
            self._inner.ended(outcome)


def _open_append(path: str) -> IO[str]:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8")


_OCSF_VERSION = "1.3.0"
_HTTP_ACTIVITY, _NETWORK_ACTIVITY = 4002, 4001


def ocsf(record: DecisionRecord, now: float) -> dict[str, Any]:
    """C{record} as an OCSF HTTP Activity (requests) or Network Activity (tunnels) event."""
    denied = record.decision == DENY
    client_ip, _, client_port = record.client.rpartition(":")
    event: dict[str, Any] = {
        "time": int(now * 1000),
        "category_uid": 4,
        "severity_id": 3 if denied else (2 if record.decision == WOULD_DENY else 1),
        "action_id": 2 if denied else 1,
        "action": "Denied" if denied else "Allowed",
        "disposition_id": 2 if denied else 1,
        "disposition": "Blocked" if denied else "Allowed",
        "status_id": 2 if denied else 1,
        "metadata": {"version": _OCSF_VERSION, "product": {"name": "navtwist", "vendor_name": "navtwist"},
                     "log_name": "decision"},
        "src_endpoint": {"ip": client_ip.strip("[]"), "port": int(client_port) if client_port.isdigit() else None},
        "dst_endpoint": {"hostname": record.host, "port": record.port},
        "unmapped": {key: value for key, value in {
            "decision": record.decision, "mode": record.mode, "entry": record.entry, "rule": record.rule,
            "reason": record.reason, "credential": record.credential}.items() if value is not None},
    }
    if record.kind == "tunnel":
        activity = 1 if not denied else 5  # Open / Refuse
        event.update(class_uid=_NETWORK_ACTIVITY, class_name="Network Activity", activity_id=activity,
                     type_uid=_NETWORK_ACTIVITY * 100 + activity,
                     traffic={"bytes_out": record.bytes_up, "bytes_in": record.bytes_down})
    else:
        activity = _HTTP_METHODS.get(record.method or "", 99)
        path, _, query = (record.path or "").partition("?")
        event.update(
            class_uid=_HTTP_ACTIVITY, class_name="HTTP Activity", activity_id=activity,
            type_uid=_HTTP_ACTIVITY * 100 + activity,
            http_request={"http_method": record.method,
                          "url": {"hostname": record.host, "port": record.port, "path": path, "query_string": query,
                                  "scheme": "https" if record.port != 80 else "http"}},
            traffic={"bytes_out": record.bytes_up, "bytes_in": record.bytes_down},
        )
        if record.status is not None:
            event["http_response"] = {"code": record.status}
    if record.duration_ms is not None:
        event["duration"] = int(record.duration_ms)
    return event


# OCSF HTTP Activity activity_id per method.
_HTTP_METHODS = {"CONNECT": 1, "DELETE": 2, "GET": 3, "HEAD": 4, "OPTIONS": 5, "POST": 6, "PUT": 7, "TRACE": 8,
                 "PATCH": 9}
