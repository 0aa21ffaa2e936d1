"""Routes one inference request to its upstream with treq, then relays the answer.

The router owns everything between "this request is protocol P" and "the
response is flowing": choosing the route, rewriting the request (headers from
an allowlist, the route's key and model), the treq call with its timeouts,
cancellation when the client leaves, and mapping failures to JSON errors.
"""
from __future__ import annotations

import json
from functools import partial
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Callable, Sequence
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from twisted.web.server import Request
from treq.client import HTTPClient
from zope.interface import implementer

from navtwist import errors
from navtwist.config import Route
from navtwist.interfaces import IProviderProfile
from navtwist.mock import MockAgent
from navtwist.protocols import STREAMING_PROTOCOLS
from navtwist.providers import get_provider
from navtwist.relay import Exchange, RelayTimeouts

log = Logger(namespace="navtwist.router")

# Request headers a client may send through; everything else (authorization,
# x-api-key, cookie, host, proxy-*, hop-by-hop) is dropped.
FORWARDED_REQUEST_HEADERS = (b"content-type", b"accept", b"accept-encoding", b"user-agent")

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
    """One treq client per route; real routes (and forwarded requests) share one connection pool."""

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 32
        self.pool.retryAutomatically = False
        self._clients: dict[Route, HTTPClient] = {}

    def client_for(self, route: Route) -> HTTPClient:
        client = self._clients.get(route)
        if client is None:
            if route.is_mock:
                agent = MockAgent(self._reactor)
            else:
                agent = Agent(self._reactor, connectTimeout=route.connect_timeout, pool=self.pool)
            client = self._clients[route] = make_client(agent)
        return client

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


def classify_failure(failure: Failure, timed_out: bool) -> errors.ErrorKind:
    """Which JSON error a failed upstream call becomes."""
    if timed_out:  # our deadline cancelled the call, whatever error that surfaced as
        return errors.UPSTREAM_TIMEOUT
    if failure.check(ConnectError, DNSLookupError, TimeoutError):
        return errors.UPSTREAM_UNAVAILABLE
    return errors.UPSTREAM_PROTOCOL


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

        def fail(failure: Failure, timed_out: bool) -> str:
            kind = classify_failure(failure, timed_out)
            errors.write_error(request, protocol, kind)
            return kind.code

        exchange = Exchange(
            request,
            self._clock,
            RelayTimeouts(route.first_byte_timeout, route.idle_timeout, self._write_stall_timeout),
            fail,
            stream_error=partial(errors.stream_error_event, protocol),
            keep_length=protocol not in STREAMING_PROTOCOLS,
            fields={"protocol": protocol, "route": route.name},
        )
        exchange.start(
            self._clients(route).request(
                request.method.decode("ascii"),
                upstream_url(route.endpoint, request.uri),
                headers=headers,
                data=body,
                unbuffered=True,
                allow_redirects=False,
            )
        )
