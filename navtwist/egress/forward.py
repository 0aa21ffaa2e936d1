"""Plain C{http://} forward proxying: absolute-form requests to allowed destinations.

Each request is checked like a tunnel (policy, resolution, SSRF guard), sent
to exactly the address that was checked, and its response streamed back with
the same relay and flow control as inference calls.  Bytes pass unchanged:
the twisted.web Agent is used directly, without treq's content decoding.
"""
from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from navtwist.egress.dial import Egress
from navtwist.intercept.credentials import CredentialSet
from navtwist.outcome import Refusal
from navtwist.inference.errors import write_json
from navtwist.egress.policy import IPAddress
from navtwist.upstream.exchange import Attempt, Deadlines, Exchange, ExchangeListener
from navtwist.upstream.failures import Cause, classify
from navtwist.upstream.relay import HOP_BY_HOP
from navtwist.upstream.body import BytesProducer
from navtwist.upstream.connection import head_too_large
from navtwist.upstream.parent import parent_refusal

_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"proxy-authorization", b"proxy-connection"}


def write_refusal(request: Request, status: int, error: str, detail: str) -> None:
    """Answer with the proxy's own JSON refusal shape."""
    write_json(request, status, {"error": error, "detail": detail})


def forwarded_headers(client: Headers, authority: bytes) -> Headers:
    """The client's headers minus hop-by-hop and proxy ones; Host from the request URI."""
    dropped = set(_NOT_FORWARDED)
    for value in client.getRawHeaders(b"connection", []):
        dropped.update(token.strip().lower() for token in value.split(b","))
    out = Headers({name: values for name, values in client.getAllRawHeaders() if name.lower() not in dropped})
    out.setRawHeaders(b"host", [authority])
    return out


def failure_refusal(failure: Failure, timed_out: bool) -> Refusal:
    """What the client of a forwarded request is told when the destination did not answer."""
    if failure.check(Refusal):
        return failure.value  # the egress stage's own words
    refused_by_parent = parent_refusal(failure)
    if refused_by_parent is not None:
        return refused_by_parent
    cause = classify(failure, timed_out)
    if cause is Cause.TIMEOUT:
        return Refusal(504, "upstream_timeout", "the destination did not answer in time")
    if cause is Cause.CONNECT:
        return Refusal(502, "upstream_unreachable", "cannot connect to the destination")
    if head_too_large(failure) is not None:
        return Refusal(502, "upstream_error", "the destination's response head exceeds the proxy's limit")
    return Refusal(502, "upstream_error", "the destination sent an invalid response")


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
        self._egress = egress
        self._agent = agent
        self._clock = clock
        self._deadlines = deadlines
        self.credentials: CredentialSet | None = None  # set (and replaced on reload) by the service

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
        else:
            self._forward(request, target, port)
        return NOT_DONE_YET

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
        write_refusal(request, 403, "credential_endpoint_mismatch",
                      f"credential {name} is never sent over plain http://")
        return True

    def _forward(self, request: Request, target: SplitResult, port: int) -> None:
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
            listener=self._listener,
        )
        # The first-byte deadline covers resolving and connecting too, and a
        # client that leaves cancels whichever step is under way.
        label = f"http://{target.hostname}:{port}"

        def send() -> Deferred[IResponse]:
            destination = self._egress.destination(target.hostname, port, label)
            return destination.addCallback(self._send, request, target, port)

        exchange.start([Attempt(send=send, deadlines=self._deadlines, fields={})])

    def _send(self, address: IPAddress, request: Request, target: SplitResult, port: int) -> Deferred[IResponse]:
        host = f"[{address}]" if address.version == 6 else str(address)
        url = f"http://{host}:{port}{target.path or '/'}" + (f"?{target.query}" if target.query else "")
        request.content.seek(0)
        body = request.content.read()
        return self._agent.request(
            request.method,
            url.encode("ascii"),
            forwarded_headers(request.requestHeaders, target.netloc.encode("ascii")),
            BytesProducer(body) if body else None,
        )
