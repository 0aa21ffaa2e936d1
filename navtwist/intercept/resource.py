"""The resource behind every intercepted host other than the inference ones.

Each request, as soon as its head is in, is checked against the host's
C{policy.intercept} entry (as it is now: a reload applies to the next
request), logged as one decision, and then either refused with an
agent-readable 403 or sent to the origin: over TLS verified for the host's
name, to the address the SSRF guard checked, its body streamed from the
client as it arrives and the answer relayed chunk by chunk with the same
flow control as every other upstream response.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from navtwist.decisions import ALLOW, DENY, WOULD_DENY, DecisionLog, DecisionRecord, redact_target
from navtwist.egress.dial import Egress
from navtwist.egress.forward import failure_refusal
from navtwist.egress.policy import IPAddress, Policy, normalize_host
from navtwist.inference.errors import write_json
from navtwist.intercept.credentials import CredentialSet, Mismatch
from navtwist.intercept.origin import OriginClients
from navtwist.intercept.rules import InterceptEntry, decide
from navtwist.upstream.exchange import Attempt, Deadlines, Exchange, ExchangeListener
from navtwist.upstream.relay import HOP_BY_HOP

log = Logger(namespace="navtwist.intercept")

# Never passed to the origin: hop-by-hop, proxy credentials, and Expect (the
# channel has already answered 100-continue itself).
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"proxy-authorization", b"proxy-connection", b"expect"}


def write_denial(request: Request, status: int, code: str, detail: str, reason: str | None = None) -> None:
    """The intercept path's refusal: JSON an agent can read, and a header naming the code."""
    document: dict[str, Any] = {"error": code, "detail": detail}
    if reason is not None:
        document["reason"] = reason
    request.responseHeaders.setRawHeaders(b"x-navtwist-error", [code.encode("ascii")])
    write_json(request, status, document)


def origin_headers(client: Headers, authority: bytes) -> Headers:
    """The client's end-to-end headers, with Host naming the intercepted authority."""
    dropped = set(_NOT_FORWARDED)
    for value in client.getRawHeaders(b"connection", []):
        dropped.update(token.strip().lower() for token in value.split(b","))
    out = Headers({name: values for name, values in client.getAllRawHeaders() if name.lower() not in dropped})
    out.setRawHeaders(b"host", [authority])
    return out


def _header_list(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


def _authority(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == 443 else f"{shown}:{port}"


def _host_matches(values: Sequence[bytes] | None, host: str, port: int) -> bool:
    """Whether the request's Host names the CONNECT target (a mismatch is domain fronting)."""
    if not values:
        return True  # HTTP/1.0 without Host: the CONNECT names the origin
    if len(values) != 1:
        return False
    text = values[0].decode("latin-1").strip().lower()
    name, _, given_port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not name or given_port and not given_port.isdigit():
        name, given_port = text, ""
    try:
        same = normalize_host(name.strip("[]")) == normalize_host(host)
    except ValueError:
        return False
    return same and (not given_port or int(given_port) == port)


class InterceptResource(Resource):
    """Checks and forwards the requests of intercepted connections (see the module doc)."""

    isLeaf = True

    def __init__(
        self,
        policy: Callable[[], Policy[InterceptEntry]],
        egress: Egress,
        origins: OriginClients,
        clock: IReactorTime,
        deadlines: Deadlines,
        decisions: DecisionLog,
        listener: ExchangeListener | None = None,
        credentials: CredentialSet | None = None,
    ) -> None:
        super().__init__()
        self._policy = policy
        self._egress = egress
        self._origins = origins
        self._clock = clock
        self._deadlines = deadlines
        self._decisions = decisions
        self._listener = listener
        self.credentials = credentials  # replaced on reload

    def render(self, request: Request) -> int:
        request.responseHeaders.setRawHeaders(b"server", [b"navtwist"])
        # Set by the listener on the channel of an intercepted CONNECT (HardenedChannel, a stage above).
        host, port = request.channel.intercepted  # type: ignore[attr-defined]
        entry = self._policy().intercept_for(host, port)
        credentials = self.credentials
        peer = request.getClientAddress()
        logged_target = credentials.redact(request.uri) if credentials is not None else request.uri
        record = DecisionRecord(
            kind="request", client=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}", host=host, port=port,
            decision=DENY, method=request.method.decode("latin-1"), path=redact_target(logged_target),
        )
        started = self._clock.seconds()
        if entry is None or entry.inference:
            # A reload removed (or changed the kind of) this entry while the connection stayed open.
            record.reason, record.status = "policy_denied", 403
            self._decide(record, started)
            write_denial(request, 403, "policy_denied", f"{_authority(host, port)} is no longer intercepted")
            return NOT_DONE_YET
        record.entry, record.mode = f"policy.intercept[{entry.index}]", entry.mode
        target = request.uri
        if not target.startswith(b"/") and target != b"*":
            record.reason, record.status = "bad_request", 400
            self._decide(record, started)
            write_denial(request, 400, "bad_request", "requests inside an intercepted connection use origin-form targets")
            return NOT_DONE_YET
        if not _host_matches(request.requestHeaders.getRawHeaders(b"host"), host, port):
            record.reason, record.status = "host_mismatch", 421
            self._decide(record, started)
            write_denial(request, 421, "host_mismatch", f"the Host header does not name {_authority(host, port)}")
            return NOT_DONE_YET
        verdict = decide(entry, request.method, target, host=host)
        record.rule = f"rules[{verdict.rule}]" if isinstance(verdict.rule, int) else verdict.rule
        if not verdict.allowed:
            record.reason, record.status = "l7_denied", 403
            self._decide(record, started)
            write_denial(request, 403, "l7_denied", verdict.detail, entry.deny_reason)
            return NOT_DONE_YET
        record.decision = ALLOW if verdict.verdict == ALLOW else WOULD_DENY
        if request.requestHeaders.hasHeader(b"upgrade"):
            record.decision, record.reason, record.status = DENY, "upgrade_unsupported", 501
            self._decide(record, started)
            write_denial(request, 501, "upgrade_unsupported", "protocol upgrades (WebSocket) are not supported on intercepted hosts")
            return NOT_DONE_YET
        headers = origin_headers(request.requestHeaders, _authority(host, port).encode("ascii"))
        if credentials is not None:
            rewritten = credentials.rewrite(host, port, target, _header_list(headers))
            if isinstance(rewritten, Mismatch):
                record.decision, record.reason, record.status = DENY, "credential_endpoint_mismatch", 403
                record.credential = rewritten.credential
                self._decide(record, started)
                write_denial(request, 403, "credential_endpoint_mismatch", rewritten.detail)
                return NOT_DONE_YET
            if rewritten.credentials:
                target, headers = rewritten.target, Headers()
                for name, value in rewritten.headers:
                    headers.addRawHeader(name, value)
                record.credential = ",".join(rewritten.credentials)
        self._forward(request, entry, target, headers, record, started)
        return NOT_DONE_YET

    def _decide(self, record: DecisionRecord, started: float) -> None:
        now = self._clock.seconds()
        record.duration_ms = round((now - started) * 1000, 1)
        self._decisions.record(record, now)

    def _forward(
        self, request: Request, entry: InterceptEntry, target: bytes, headers: Headers,
        record: DecisionRecord, started: float,
    ) -> None:
        host, port = record.host, record.port
        label = f"{request.method.decode('latin-1')} https://{_authority(host, port)}"
        body = getattr(request, "body", None)  # a StreamingRequest's pipe

        def fail(failure: Failure, timed_out: bool) -> str:
            refusal = failure_refusal(failure, timed_out)
            write_denial(request, refusal.status, refusal.code, refusal.message)
            return refusal.code

        def send() -> Deferred[IResponse]:
            destination = self._egress.destination(host, port, label, intercepted=True)
            return destination.addCallback(self._send, host, port, request.method, entry, target, headers, body)

        exchange = Exchange(
            request, self._clock, fail, stream_error=None, keep_length=True,
            fields={"intercept": _authority(host, port)},
            listener=_Decided(self, record, started, body, self._listener),
        )
        exchange.start([Attempt(send=send, deadlines=self._deadlines, fields={})])

    def _send(
        self, address: IPAddress, host: str, port: int, method: bytes, entry: InterceptEntry, target: bytes,
        headers: Headers, body: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        agent = self._origins.agent_for(host, port, address, entry.upstream_ca_certs)
        has_body = body is not None and (getattr(body, "length", 0) != 0)
        url = f"https://{_authority(host, port)}".encode("ascii") + target
        return agent.request(method, url, headers, body if has_body else None)


class _Decided:
    """Writes an allowed request's decision when its exchange ends, with status and sizes."""

    def __init__(
        self, resource: InterceptResource, record: DecisionRecord, started: float, body: object,
        inner: ExchangeListener | None,
    ) -> None:
        self._resource = resource
        self._record = record
        self._started = started
        self._body = body
        self._inner = inner

    def attempt_failed(self, failure: Failure, timed_out: bool) -> None:
        if self._inner is not None:
            self._inner.attempt_failed(failure, timed_out)

    def ended(self, record: dict[str, Any]) -> None:
        decision = self._record
        decision.status = record.get("status")
        decision.bytes_down = int(record.get("bytes") or 0)
        decision.bytes_up = int(getattr(self._body, "received", 0))
        if record.get("outcome") == "rejected":
            decision.decision, decision.reason = DENY, record.get("detail")
        self._resource._decide(decision, self._started)
        if self._inner is not None:
            self._inner.ended(record)
