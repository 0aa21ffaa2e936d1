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
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from navtwist.decisions import ALLOW, DENY, WOULD_DENY, DecisionLog, DecisionOnEnd, DecisionRecord, redact_target
from navtwist.egress.dial import Egress
from navtwist.egress.forward import failure_refusal, forwarded_headers
from navtwist.egress.policy import IPAddress, Policy, normalize_host
from navtwist.inference.errors import write_json
from navtwist.intercept.credentials import CredentialSet, Mismatch
from navtwist.intercept.origin import OriginClients
from navtwist.intercept.upgrade import UpgradeClient, upgrade_head
from navtwist.intercept.rules import InterceptEntry, decide
from navtwist.upstream.body import upstream_body
from navtwist.upstream.parent import PreparedFactory
from navtwist.upstream.exchange import Attempt, Deadlines, Exchange, ExchangeListener


# Besides what the forward path drops (hop-by-hop, proxy credentials): Expect,
# which the channel has already answered with 100 Continue itself.
_ALSO_DROPPED = frozenset({b"expect"})


def write_denial(request: Request, status: int, code: str, detail: str, reason: str | None = None) -> None:
    """The intercept path's refusal: JSON an agent can read, and a header naming the code."""
    document: dict[str, Any] = {"error": code, "detail": detail}
    if reason is not None:
        document["reason"] = reason
    request.responseHeaders.setRawHeaders(b"x-navtwist-error", [code.encode("ascii")])
    write_json(request, status, document)


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
        max_response_head_bytes: int = 65536,
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
        self._max_head = max_response_head_bytes

    def render(self, request: Request) -> int:
        request.responseHeaders.setRawHeaders(b"server", [b"navtwist"])
        # Set by the listener on the channel of an intercepted CONNECT (HardenedChannel, a stage above).
        host, port = request.channel.intercepted  # type: ignore[attr-defined]
        target = request.uri
        credentials = self.credentials
        started = self._clock.seconds()
        judged = self._judge(request, host, port, target, started)
        if judged is None:
            return NOT_DONE_YET
        entry, record = judged
        headers = request.requestHeaders
        if credentials is not None:
            # Every header the client sent, also those never forwarded: a
            # placeholder bound elsewhere refuses the request wherever it is.
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
        headers = forwarded_headers(headers, _authority(host, port).encode("ascii"), _ALSO_DROPPED)
        if request.requestHeaders.hasHeader(b"upgrade"):
            self._upgrade(request, entry, target, headers, record, started)
        else:
            self._forward(request, entry, target, headers, record, started)
        return NOT_DONE_YET

    def _upgrade(
        self, request: Request, entry: InterceptEntry, target: bytes, headers: Headers,
        record: DecisionRecord, started: float,
    ) -> None:
        """Send an upgrade to the origin on a connection of its own; on 101, splice (see L{navtwist.intercept.upgrade})."""
        host, port = record.host, record.port
        client = UpgradeClient(upgrade_head(request.method, target, headers, request.requestHeaders),
                               self._max_head, self._clock, self._deadlines.first_byte)
        dialing = self._destination(request, host, port)
        dialing.addCallback(lambda address: self._origins.connect(
            host, port, address, entry.upstream_ca_certs, PreparedFactory(client)))
        dialing.addCallback(lambda _: client.answered)

        gone: list[Failure] = []  # set when the client leaves (or the upgrade takes its connection)

        def upgraded(answer: tuple[UpgradeClient, bytes]) -> None:
            origin, head = answer
            if gone:
                origin.transport.loseConnection()
                return
            record.status = 101
            origin.spliced(request.channel.upgrade(origin.transport, head, record))  # type: ignore[attr-defined]

        def refused(failure: Failure) -> None:
            refusal = failure_refusal(failure, False)
            record.decision, record.reason, record.status = DENY, refusal.code, refusal.status
            self._decide(record, started)
            if not gone:
                write_denial(request, refusal.status, refusal.code, refusal.message)

        def left(reason: Failure) -> None:
            gone.append(reason)
            dialing.cancel()

        dialing.addCallbacks(upgraded, refused)
        request.notifyFinish().addErrback(left)

    def judge_forwarded(self, request: Request, host: str, port: int, target: bytes) -> ExchangeListener | None:
        """Judge an absolute-form C{http://} request to an intercepted host
        (C{target} in origin-form) by the entry's rules, as requests inside
        its TLS are: None once it is refused (answered and logged), else the
        listener that logs the decision when the forwarded exchange ends."""
        started = self._clock.seconds()
        judged = self._judge(request, host, port, target, started)
        if judged is None:
            return None
        return DecisionOnEnd(self._decisions, self._clock, judged[1], started, getattr(request, "body", None),
                             self._listener)

    def _judge(
        self, request: Request, host: str, port: int, target: bytes, started: float
    ) -> tuple[InterceptEntry, DecisionRecord] | None:
        """The entry and the (not yet logged) decision for a request it lets
        through, or None once the request is refused and the refusal logged."""
        entry = self._policy().intercept_for(host, port)
        credentials = self.credentials
        peer = request.getClientAddress()
        logged_target = credentials.redact(target) if credentials is not None else target
        record = DecisionRecord(
            kind="request", client=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}", host=host, port=port,
            decision=DENY, method=request.method.decode("latin-1"), path=redact_target(logged_target),
        )
        if entry is None or entry.inference:
            # A reload removed (or changed the kind of) this entry while the connection stayed open.
            record.reason, record.status = "policy_denied", 403
            self._decide(record, started)
            write_denial(request, 403, "policy_denied", f"{_authority(host, port)} is no longer intercepted")
            return None
        record.entry, record.mode = f"policy.intercept[{entry.index}]", entry.mode
        if not target.startswith(b"/") and target != b"*":
            record.reason, record.status = "bad_request", 400
            self._decide(record, started)
            write_denial(request, 400, "bad_request", "requests inside an intercepted connection use origin-form targets")
            return None
        if not _host_matches(request.requestHeaders.getRawHeaders(b"host"), host, port):
            record.reason, record.status = "host_mismatch", 421
            self._decide(record, started)
            write_denial(request, 421, "host_mismatch", f"the Host header does not name {_authority(host, port)}")
            return None
        verdict = decide(entry, request.method, target, host=host)
        record.rule = f"rules[{verdict.rule}]" if isinstance(verdict.rule, int) else verdict.rule
        if not verdict.allowed:
            record.reason, record.status = "l7_denied", 403
            self._decide(record, started)
            write_denial(request, 403, "l7_denied", verdict.detail, entry.deny_reason)
            return None
        record.decision = ALLOW if verdict.verdict == ALLOW else WOULD_DENY
        return entry, record

    def _decide(self, record: DecisionRecord, started: float) -> None:
        self._decisions.finish(record, started, self._clock.seconds())

    def _destination(self, request: Request, host: str, port: int) -> Deferred[IPAddress]:
        """The checked address of the origin, for a forwarded request and an upgrade alike."""
        label = f"{request.method.decode('latin-1')} https://{_authority(host, port)}"
        return self._egress.destination(host, port, label, intercepted=True)

    def _forward(
        self, request: Request, entry: InterceptEntry, target: bytes, headers: Headers,
        record: DecisionRecord, started: float,
    ) -> None:
        host, port = record.host, record.port
        body = getattr(request, "body", None)  # a StreamingRequest's pipe

        def fail(failure: Failure, timed_out: bool) -> str:
            refusal = failure_refusal(failure, timed_out)
            write_denial(request, refusal.status, refusal.code, refusal.message)
            return refusal.code

        def send() -> Deferred[IResponse]:
            destination = self._destination(request, host, port)
            return destination.addCallback(self._send, host, port, request.method, entry, target, headers, body)

        exchange = Exchange(
            request, self._clock, fail, stream_error=None, keep_length=True,
            fields={"intercept": _authority(host, port)},
            listener=DecisionOnEnd(self._decisions, self._clock, record, started, body, self._listener),
        )
        exchange.start([Attempt(send=send, deadlines=self._deadlines, fields={})])

    def _send(
        self, address: IPAddress, host: str, port: int, method: bytes, entry: InterceptEntry, target: bytes,
        headers: Headers, body: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        agent = self._origins.agent_for(host, port, address, entry.upstream_ca_certs)
        url = f"https://{_authority(host, port)}".encode("ascii") + target
        return agent.request(method, url, headers, upstream_body(body))
