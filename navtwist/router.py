"""Routes one inference request to its upstream with treq, then relays the answer.

The router owns everything between "this request is protocol P" and "the
response is flowing": choosing the route, rewriting the request (headers from
an allowlist, the route's key and model), the treq call with its timeouts,
cancellation when the client leaves, and mapping failures to JSON errors.
"""
from __future__ import annotations

import json
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Callable, Sequence
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.server import Request
from treq.client import HTTPClient
from zope.interface import implementer

from navtwist import errors
from navtwist.config import Route
from navtwist.interfaces import IProviderProfile
from navtwist.mock import MockAgent
from navtwist.protocols import STREAMING_PROTOCOLS
from navtwist.providers import get_provider
from navtwist.relay import CLIENT_GONE, ResponseRelay

log = Logger(namespace="navtwist.router")

# Request headers a client may send through; everything else (authorization,
# x-api-key, cookie, host, proxy-*, hop-by-hop) is dropped.
FORWARDED_REQUEST_HEADERS = (b"content-type", b"accept", b"accept-encoding", b"user-agent")

# Response headers that describe one hop, not the response.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
        b"proxy-authorization", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
    }
)


def upstream_url(endpoint: str, uri: bytes) -> bytes:
    """The upstream URL for request-target C{uri} on a route's C{endpoint}.

    An endpoint whose path ends in C{/v1} or starts with C{/v1/} already names
    the API version, so the request's leading C{/v1} is dropped (OpenShell's
    rule).  The query string is kept.
    """
    parts = urlsplit(endpoint)
    endpoint_path = parts.path.rstrip("/")
    base = f"{parts.scheme}://{parts.netloc}{endpoint_path}"
    path, sep, query = uri.partition(b"?")
    if (endpoint_path.endswith("/v1") or endpoint_path.startswith("/v1/")) and path.startswith(b"/v1/"):
        path = path[len(b"/v1"):]
    return base.encode("ascii") + path + sep + query


def upstream_headers(client: Headers, provider: IProviderProfile, api_key: str) -> Headers:
    """Request headers for the upstream: an allowlist, provider defaults, the route's key."""
    out = Headers()
    for name in (*FORWARDED_REQUEST_HEADERS, *sorted(provider.passthrough_headers)):
        values = client.getRawHeaders(name)
        if values:
            out.setRawHeaders(name, values)
    for name, value in provider.default_headers:
        if not out.hasHeader(name):
            out.setRawHeaders(name, [value])
    for name, value in provider.auth_headers(api_key):
        out.setRawHeaders(name, [value])
    return out


def rewrite_model(body: bytes, model: str) -> bytes:
    """Set C{model} in a JSON-object body, keeping the other keys in order.

    @raise ValueError: C{body} is not JSON.
    """
    document = json.loads(body)
    if not isinstance(document, dict):
        return body
    document["model"] = model
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def client_response_headers(upstream: Headers, keep_length: bool) -> list[tuple[bytes, list[bytes]]]:
    """The upstream's response headers minus hop-by-hop ones (and the length when re-chunking)."""
    dropped = set(HOP_BY_HOP)
    for value in upstream.getRawHeaders(b"connection", []):
        dropped.update(token.strip().lower() for token in value.split(b","))
    if not keep_length:
        dropped.add(b"content-length")
    return [
        (name, values)
        for name, values in upstream.getAllRawHeaders()
        if name.lower() not in dropped
    ]


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Discard(Protocol):
    """Takes a response nobody will read and closes its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def make_client(agent: IAgent) -> HTTPClient:
    """A treq client for the proxy's use of C{agent}.

    Its cookie jar stores nothing (cookies set by an upstream must never leak
    from one sandbox request into the next) and bodies are sent from memory.
    """
    return HTTPClient(
        agent,
        cookiejar=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
        data_to_body_producer=BytesProducer,
    )


class UpstreamClients:
    """One treq client per route; real routes share one connection pool."""

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 32
        self._pool.retryAutomatically = False
        self._clients: dict[Route, HTTPClient] = {}

    def client_for(self, route: Route) -> HTTPClient:
        client = self._clients.get(route)
        if client is None:
            if route.is_mock:
                agent = MockAgent(self._reactor)
            else:
                agent = Agent(self._reactor, connectTimeout=route.connect_timeout, pool=self._pool)
            client = self._clients[route] = make_client(agent)
        return client

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()


def classify_failure(failure: Failure, timed_out: bool) -> errors.ErrorKind:
    """Which JSON error a failed upstream call becomes."""
    if timed_out and failure.check(CancelledError):
        return errors.UPSTREAM_TIMEOUT
    if failure.check(ConnectError, DNSLookupError, TimeoutError):
        return errors.UPSTREAM_UNAVAILABLE
    return errors.UPSTREAM_PROTOCOL


class Exchange:
    """One inference call, from sending it upstream to the end of the relayed answer."""

    def __init__(
        self,
        request: Request,
        protocol: str,
        route: Route,
        clock: IReactorTime,
        write_stall_timeout: float,
    ) -> None:
        self._request = request
        self._protocol = protocol
        self._route = route
        self._clock = clock
        self._write_stall_timeout = write_stall_timeout
        self._started = clock.seconds()
        self._pending: Deferred[IResponse] | None = None
        self._first_byte_call: IDelayedCall | None = None
        self._timed_out = False
        self._client_left = False
        self._relay: ResponseRelay | None = None
        self._status: int | None = None
        self._headers_at: float | None = None

    def start(self, client: HTTPClient, method: bytes, url: bytes, headers: Headers, body: bytes | None) -> None:
        self._request.notifyFinish().addErrback(self._client_gone)
        self._pending = client.request(
            method.decode("ascii"),
            url,
            headers=headers,
            data=body,
            unbuffered=True,
            allow_redirects=False,
        )
        self._first_byte_call = self._clock.callLater(self._route.first_byte_timeout, self._first_byte_timeout)
        self._pending.addCallbacks(self._got_response, self._failed)

    def _first_byte_timeout(self) -> None:
        self._first_byte_call = None
        self._timed_out = True
        if self._pending is not None:
            self._pending.cancel()

    def _client_gone(self, reason: Failure) -> None:
        self._client_left = True
        if self._relay is not None:
            self._relay.stopProducing()
        elif self._pending is not None:
            self._pending.cancel()

    def _settled(self) -> None:
        self._pending = None
        if self._first_byte_call is not None and self._first_byte_call.active():
            self._first_byte_call.cancel()
        self._first_byte_call = None

    def _got_response(self, response: IResponse) -> None:
        self._settled()
        self._headers_at = self._clock.seconds()
        self._status = response.code
        if self._client_left:
            response.deliverBody(_Discard())
            self._finished(CLIENT_GONE)
            return
        streaming = self._protocol in STREAMING_PROTOCOLS
        keep_length = not streaming and response.length is not UNKNOWN_LENGTH
        request = self._request
        request.setResponseCode(response.code, response.phrase or None)
        request.responseHeaders = Headers(dict(client_response_headers(response.headers, keep_length)))
        request.write(b"")  # the status line and headers go out now, before any body
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        self._relay = ResponseRelay(
            request,
            self._clock,
            self._protocol,
            sse=content_type.lower().startswith(b"text/event-stream"),
            idle_timeout=self._route.idle_timeout,
            write_stall_timeout=self._write_stall_timeout,
            done=self._finished,
        )
        response.deliverBody(self._relay)

    def _failed(self, failure: Failure) -> None:
        self._settled()
        if self._client_left:
            self._finished(CLIENT_GONE)
            return
        kind = classify_failure(failure, self._timed_out)
        log.warn(
            "upstream call failed: route={route} error={error}",
            route=self._route.name,
            error=failure.type.__name__,
        )
        self._status = kind.status
        errors.write_error(self._request, self._protocol, kind)
        self._finished(kind.code)

    def _finished(self, outcome: str) -> None:
        now = self._clock.seconds()
        log.info(
            "inference protocol={protocol} route={route} status={status} outcome={outcome} "
            "headers_ms={headers_ms} duration_ms={duration_ms} bytes={bytes}",
            protocol=self._protocol,
            route=self._route.name,
            status=self._status,
            outcome=outcome,
            headers_ms=None if self._headers_at is None else round((self._headers_at - self._started) * 1000, 1),
            duration_ms=round((now - self._started) * 1000, 1),
            bytes=0 if self._relay is None else self._relay.bytes_relayed,
        )


class InferenceRouter:
    """Chooses a route for each protocol and sends requests there."""

    def __init__(
        self,
        routes: Sequence[Route],
        clock: IReactorTime,
        clients: Callable[[Route], HTTPClient],
        write_stall_timeout: float,
    ) -> None:
        self._routes = tuple(routes)
        self._clock = clock
        self._clients = clients
        self._write_stall_timeout = write_stall_timeout

    def pick(self, protocol: str) -> Route | None:
        """The first route that serves C{protocol}."""
        for route in self._routes:
            if protocol in route.protocols:
                return route
        return None

    def forward(self, request: Request, protocol: str, route: Route, body: bytes | None) -> None:
        """Send C{request} to C{route}'s upstream and relay the answer to the client.

        @raise ValueError: C{body} is not JSON.
        """
        if body:
            body = rewrite_model(body, route.model)
        headers = upstream_headers(request.requestHeaders, get_provider(route.provider_type), route.api_key)
        exchange = Exchange(request, protocol, route, self._clock, self._write_stall_timeout)
        exchange.start(self._clients(route), request.method, upstream_url(route.endpoint, request.uri), headers, body)
