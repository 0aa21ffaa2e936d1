"""Plain C{http://} forward proxying: absolute-form requests to allowed destinations.

Each request is checked like a tunnel (policy, resolution, SSRF guard), sent
to exactly the address that was checked, and its response streamed back with
the same relay and flow control as inference calls.  Bytes pass unchanged:
the twisted.web Agent is used directly, without treq's content decoding.
The request body is never held: the site's requests are rendered at their
head (L{navtwist.http.streaming.StreamingRequest}) and the body is read from
the client only as fast as the destination takes it.
"""
from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import SplitResult, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from navtwist.decisions import ALLOW, DENY, DecisionLog, DecisionOnEnd, DecisionRecord, redact_target
from navtwist.egress.dial import Egress
from navtwist.intercept.credentials import CredentialSet
from navtwist.outcome import Refusal
from navtwist.inference.errors import write_json
from navtwist.egress.policy import IPAddress
from navtwist.upstream.exchange import Attempt, Deadlines, Exchange, ExchangeListener
from navtwist.upstream.failures import Cause, classify, describe
from navtwist.upstream.relay import HOP_BY_HOP
from navtwist.upstream.body import upstream_body
from navtwist.upstream.connection import head_too_large
from navtwist.upstream.parent import parent_refusal

# Content-Length too: the Agent sets it from the body it sends, the length the client declared or chunked
# when it sent chunks (a second one makes strict origins refuse).
_NOT_FORWARDED = HOP_BY_HOP | {b"content-length", b"host", b"proxy-authorization", b"proxy-connection"}


def write_refusal(request: Request, status: int, error: str, detail: str) -> None:
    """Answer with the proxy's own JSON refusal shape."""
    write_json(request, status, {"error": error, "detail": detail})


def forwarded_headers(client: Headers, authority: bytes, also_dropped: frozenset[bytes] = frozenset()) -> Headers:
    """The client's headers minus hop-by-hop and proxy ones (and C{also_dropped});
    Host naming C{authority}, the destination that was checked.

    Names with C{_} are dropped too (as nginx does): an origin that reads
    C{Transfer_Encoding} as C{Transfer-Encoding} would see a second framing.
    """
    dropped = set(_NOT_FORWARDED) | also_dropped
    for value in client.getRawHeaders(b"connection", []):
        dropped.update(token.strip().lower() for token in value.split(b","))
    out = Headers({name: values for name, values in client.getAllRawHeaders()
                   if name.lower() not in dropped and b"_" not in name})
    out.setRawHeaders(b"host", [authority])
    return out


def failure_refusal(failure: Failure, timed_out: bool) -> Refusal:
    """What the client of a forwarded request is told when the destination did not answer."""
    if isinstance(failure.value, Refusal):
        return failure.value  # the egress stage's own words
    refused_by_parent = parent_refusal(failure)
    if refused_by_parent is not None:
        return refused_by_parent
    cause = classify(failure, timed_out)
    why = describe(failure, timed_out)
    if cause is Cause.TIMEOUT:
        return Refusal(504, "upstream_timeout", f"the destination did not answer in time: {why}")
    if cause is Cause.CONNECT:
        return Refusal(502, "upstream_unreachable", f"cannot connect to the destination: {why}")
    if head_too_large(failure) is not None:
        return Refusal(502, "upstream_error", "the destination's response head exceeds the proxy's limit")
    if cause is Cause.TLS:
        return Refusal(502, "upstream_error", f"the destination's TLS was refused: {why}")
    return Refusal(502, "upstream_error", "the destination sent an invalid response")


class InterceptedRequests(Protocol):
    """The intercept stage's judgement of a forwarded request to a host listed in C{policy.intercept}."""

    def judge_forwarded(self, request: Request, host: str, port: int, target: bytes) -> ExchangeListener | None:
        """None once the request is refused and answered, else the listener that logs the decision."""


class ForwardResource(Resource):
    """Serves absolute-form C{http://} requests made to the proxy."""

    isLeaf = True

    def __init__(
        self,
        egress: Egress,
        agent: IAgent,
        clock: IReactorTime,
        deadlines: Deadlines,
        listener: ExchangeListener | None = None,
    ) -> None:
        super().__init__()
        self._listener = listener
        # Judges requests to intercepted hosts; without it they are refused (policy_denied), never forwarded.
        self.intercept: InterceptedRequests | None = None
        self._egress = egress
        self._agent = agent
        self._clock = clock
        self._deadlines = deadlines
        self.credentials: CredentialSet | None = None  # set (and replaced on reload) by the service
        self.decisions: DecisionLog | None = None  # set by the service

    def render(self, request: Request) -> int:
        request.responseHeaders.setRawHeaders(b"server", [b"navtwist"])
        if self._carries_placeholder(request):
            return NOT_DONE_YET
        try:
            target = urlsplit(request.uri.decode("ascii"))
            port = target.port or 80
        except (UnicodeDecodeError, ValueError):
            write_refusal(request, 400, "bad_request", "invalid request URI")
            return NOT_DONE_YET
        if target.scheme == "https":
            write_refusal(request, 400, "bad_request", "use CONNECT for https:// URLs")
        elif target.scheme != "http" or not target.hostname:
            write_refusal(request, 400, "bad_request", "expected an absolute http:// URI")
        elif target.username is not None or target.password is not None:
            write_refusal(request, 400, "bad_request", "credentials in the URI are not forwarded")
        elif self.intercept is not None and self._egress.policy.intercept_for(target.hostname, port) is not None:
            origin_form = (target.path or "/") + (f"?{target.query}" if target.query else "")
            listener = self.intercept.judge_forwarded(request, target.hostname, port, origin_form.encode("ascii"))
            if listener is not None:
                self._forward(request, target, port, listener, intercepted=True)
        else:
            self._forward(request, target, port, self._decided(request, target, port))
        return NOT_DONE_YET

    def _decided(self, request: Request, target: SplitResult, port: int) -> ExchangeListener | None:
        """The listener that logs this request's decision (allowed, or refused by
        the egress checks) when its exchange ends, then tells the metrics."""
        if self.decisions is None:
            return self._listener
        record = _record(request, target, port, decision=ALLOW, entry="policy.allow")
        return DecisionOnEnd(self.decisions, self._clock, record, self._clock.seconds(), getattr(request, "body", None),
                             self._listener)

    def _carries_placeholder(self, request: Request) -> bool:
        """Secrets never travel in clear text: a placeholder in a plain http://
        request is refused whatever the host (there is nothing to swap it for)."""
        credentials = self.credentials
        if credentials is None:
            return False
        head = b"\r\n".join([request.uri] + [b"%s: %s" % (name, value)
                                             for name, values in request.requestHeaders.getAllRawHeaders()
                                             for value in values])
        name = credentials.contains_placeholder(head)
        if name is None:
            return False
        if self.decisions is not None:
            try:  # the logged URI has its placeholders replaced by the credential's name
                target = urlsplit(credentials.redact(request.uri).decode("latin-1"))
                port = target.port or 80
            except ValueError:
                target, port = urlsplit(""), 80  # unparsable: logged without host and path
            record = _record(request, target, port, decision=DENY, reason="credential_endpoint_mismatch",
                             status=403, credential=name)
            now = self._clock.seconds()
            self.decisions.finish(record, now, now)
        write_refusal(request, 403, "credential_endpoint_mismatch",
                      f"credential {name} is never sent over plain http://")
        return True

    def _forward(
        self, request: Request, target: SplitResult, port: int, listener: ExchangeListener | None,
        intercepted: bool = False,
    ) -> None:
        def fail(failure: Failure, timed_out: bool) -> str:
            refusal = failure_refusal(failure, timed_out)
            write_refusal(request, refusal.status, refusal.code, refusal.message)
            return refusal.code

        exchange = Exchange(
            request,
            self._clock,
            fail,
            stream_error=None,
            keep_length=True,
            fields={"forward": f"{target.hostname}:{port}"},
            listener=listener,
        )
        # The first-byte deadline covers resolving and connecting too, and a
        # client that leaves cancels whichever step is under way.
        label = f"http://{target.hostname}:{port}"

        def send() -> Deferred[IResponse]:
            assert target.hostname is not None  # render() refused a URI without one
            destination = self._egress.destination(target.hostname, port, label, intercepted)
            return destination.addCallback(self._send, request, target, port)

        exchange.start([Attempt(send=send, deadlines=self._deadlines, fields={})])

    def _send(self, address: IPAddress, request: Request, target: SplitResult, port: int) -> Deferred[IResponse]:
        host = f"[{address}]" if address.version == 6 else str(address)
        url = f"http://{host}:{port}{target.path or '/'}" + (f"?{target.query}" if target.query else "")
        return self._agent.request(
            request.method,
            url.encode("ascii"),
            forwarded_headers(request.requestHeaders, target.netloc.encode("ascii")),
            upstream_body(request.body),  # type: ignore[attr-defined]  # the site's StreamingRequest's pipe
        )


def _record(request: Request, target: SplitResult, port: int, **fields: Any) -> DecisionRecord:
    """The decision record of a forwarded request to C{target} (query values redacted)."""
    peer = request.getClientAddress()
    origin_form = (target.path or "/") + (f"?{target.query}" if target.query else "")
    return DecisionRecord(
        kind="request", client=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
        host=target.hostname or "", port=port, method=request.method.decode("latin-1"),
        path=redact_target(origin_form), **fields,
    )
