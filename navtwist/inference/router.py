"""Routes one inference request to its upstream with treq, then relays the answer.

The router owns everything between "this request is protocol P" and "the
response is flowing": choosing the route, rewriting the request (headers from
an allowlist, the route's key and model), the treq call with its timeouts,
cancellation when the client leaves, and mapping failures to JSON errors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.server import Request
from treq.client import HTTPClient

from navtwist.compat import set_pool_factory
from navtwist.inference import errors
from navtwist.config import Limits, Route, UpstreamProxy
from navtwist.outcome import Refusal
from navtwist.interfaces import IProviderProfile, IProxyReactor, IRequestHook, IStreamObserver
from navtwist.inference.mock import MockAgent
from navtwist.inference.protocols import COUNT_TOKENS_PATH, STREAMING_PROTOCOLS
from navtwist.inference.providers import get_provider
from navtwist.upstream.body import BytesProducer
from navtwist.upstream.connection import HeadLimits, client_factory, refused_answer
from navtwist.upstream.decode import DecodeLimits, DecodingAgent
from navtwist.upstream.descriptors import DescriptorWatch, IdleBudget
from navtwist.upstream.endpoints import UpstreamEndpoints
from navtwist.upstream.exchange import Attempt, Deadlines, Exchange, log_request, refusal_record
from navtwist.upstream.failures import Cause, classify, describe
from navtwist.upstream.parent import parent_refusal
from navtwist.inference.hooks import InferenceRequest, run_request_hooks
from navtwist.inference.observe import MetricsListener, MetricsSink, Observation


# Request headers a client may send through; everything else (authorization,
# x-api-key, cookie, host, proxy-*, hop-by-hop) is dropped.
FORWARDED_REQUEST_HEADERS = (b"content-type", b"accept", b"accept-encoding", b"user-agent")

def upstream_headers(client: Headers, provider: IProviderProfile, api_key: str, extra: Headers | None = None) -> Headers:
    """Request headers for the upstream: an allowlist, hooks' additions, provider
    defaults, and last the route's key (which nothing can override)."""
    out = Headers()
    for name in (*FORWARDED_REQUEST_HEADERS, *sorted(provider.passthrough_headers)):
        values = client.getRawHeaders(name)
        if values:
            out.setRawHeaders(name, values)
    for name, values in (extra.getAllRawHeaders() if extra is not None else ()):
        out.setRawHeaders(name, values)
    for name, value in provider.default_headers:
        if not out.hasHeader(name):
            out.setRawHeaders(name, [value])
    for name, value in provider.auth_headers(api_key):
        out.setRawHeaders(name, [value])
    return out


def parse_body(body: bytes | None) -> object:
    """The request's JSON document (None without a body).

    @raise ValueError: C{body} is not JSON.
    """
    return json.loads(body) if body else None


def body_for(body: bytes | None, document: object, model: str | None) -> bytes | None:
    """The body to send upstream: a JSON object (as hooks left it) gets C{model};
    other keys keep their order."""
    if not isinstance(document, dict):
        return body
    if model is not None:
        document = {**document, "model": model}
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def client_model(document: object) -> str | None:
    """The model a client asked for, if its body names one."""
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else None


def upstream_model(route: Route, requested: str | None) -> str | None:
    """The model the upstream is asked for: the route's, or the client's on passthrough routes."""
    if route.passthrough_model and requested:
        return requested
    return route.model or requested


def make_client(agent: IAgent, decode: DecodeLimits = DecodeLimits()) -> HTTPClient:
    """A treq client for the proxy's use of C{agent}.

    Its cookie jar stores nothing (cookies set by an upstream must never leak
    from one sandbox request into the next) and bodies are sent from memory.
    Upstreams are asked for identity bodies; one gzip layer is decoded within
    C{decode}'s caps (L{DecodingAgent}), so treq's own unbounded gzip decoder
    never sees an encoded body.
    """
    return HTTPClient(
        DecodingAgent(agent, decode),
        # treq >= 25 annotates its IndexableCookieJar (absent before 25); a plain jar is all it uses here.
        cookiejar=CookieJar(DefaultCookiePolicy(allowed_domains=[])),  # type: ignore[arg-type]
        data_to_body_producer=BytesProducer,
    )


class UpstreamClients:
    """One treq client per route; real routes (and forwarded requests) share one connection pool.

    The pool's connections cap response heads and bound their socket buffers
    (C{limits}); inference bodies are decoded within C{limits}' caps.  With
    C{parent}, routes connect through that parent proxy.
    """

    def __init__(self, reactor: IProxyReactor, limits: Limits = Limits(), parent: UpstreamProxy | None = None,
                 descriptors: DescriptorWatch | None = None, idle: IdleBudget | None = None) -> None:
        self._reactor = reactor
        self.parent = parent
        self._decode = DecodeLimits(limits.max_decoded_bytes, limits.max_decompression_ratio)
        self._descriptors = descriptors
        # Idle keep-alive connections: 128 per upstream, all pools together within the descriptor budget.
        self.pool = (idle or IdleBudget.for_soft_limit()).pool(reactor, per_host=128)
        self.pool.retryAutomatically = False
        set_pool_factory(self.pool, client_factory(
            HeadLimits(limits.max_response_head_bytes, limits.max_response_headers), limits.socket_buffer_bytes
        ))
        self._clients: dict[Route, HTTPClient] = {}

    def client_for(self, route: Route) -> HTTPClient:
        client = self._clients.get(route)
        if client is None:
            if route.is_mock:
                agent = MockAgent(self._reactor)
            else:
                endpoints = UpstreamEndpoints(self._reactor, route.connect_timeout, parent=self.parent,
                                              descriptors=self._descriptors)
                agent = Agent.usingEndpointFactory(self._reactor, endpoints, pool=self.pool)
            client = self._clients[route] = make_client(agent, self._decode)
        return client

    def retain(self, routes: Sequence[Route]) -> None:
        """Forget clients of routes a reload removed (calls under way keep theirs)."""
        self._clients = {route: client for route, client in self._clients.items() if route in routes}

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


class RouteGate:
    """Counts a route's calls in flight against its C{max_concurrent}."""

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self.active = 0

    def try_acquire(self) -> bool:
        if self._limit is not None and self.active >= self._limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


@dataclass
class Extensions:
    """What operators plugged in: request hooks, stream observers, metrics."""

    hooks: Sequence[IRequestHook] = ()
    observers: Sequence[IStreamObserver] = ()
    metrics: MetricsSink | None = None


class InferenceRouter:
    """Chooses the candidate routes for each request and sends it there.

    C{routes} (and C{extensions}) may be replaced at any time, by a config
    reload: requests already under way keep what they started with.
    """

    def __init__(
        self,
        routes: Sequence[Route],
        clock: IReactorTime,
        clients: Callable[[Route], HTTPClient],
        write_stall_timeout: float,
        extensions: Extensions | None = None,
    ) -> None:
        self._clock = clock
        self._clients = clients
        self._write_stall_timeout = write_stall_timeout
        self.extensions = extensions or Extensions()
        self._gates: dict[Route, RouteGate] = {}
        self.replace_routes(routes)

    def replace_routes(self, routes: Sequence[Route]) -> None:
        """Take new routes for new requests; a route kept unchanged keeps its gate."""
        self.routes = tuple(routes)
        self._gates = {route: self._gates.get(route) or RouteGate(route.max_concurrent) for route in self.routes}

    def serves(self, protocol: str) -> bool:
        return any(protocol in route.protocols for route in self.routes)

    def candidates(self, protocol: str, model: str | None) -> list[Route]:
        """The routes to try, in order, for C{protocol} and the client's C{model}.

        The first is the first route listing C{model} in C{models:}, else the
        first without C{models:} (the protocol's default).  Then come the other
        routes with its name that would take the same request, then those
        named in its C{fallback:} list.
        """
        serving = [route for route in self.routes if protocol in route.protocols]

        def accepts(route: Route) -> bool:
            return not route.models or model in route.models

        first = next((r for r in serving if model is not None and model in r.models), None)
        first = first or next((r for r in serving if not r.models), None)
        if first is None:
            return []
        ordered = [first] + [r for r in serving if r.name == first.name and r is not first and accepts(r)]
        for name in first.fallback:
            ordered += [r for r in serving if r.name == name and r not in ordered]
        return ordered

    def model_names(self) -> list[str]:
        """The model names clients may ask for, as configured (no upstream is asked)."""
        names: dict[str, None] = {}
        for route in self.routes:
            for name in route.models or ((route.model,) if route.model else ()):
                names[name] = None
        return list(names)

    def refuse(self, request: Request, refusal: Refusal, message: str | None = None,
               fields: Mapping[str, Any] | None = None) -> None:
        """Answer C{request} with a refusal navtwist made itself, in its client's error shape."""
        shape = errors.refusal_shape((request.method, request.path), request.requestHeaders)
        errors.write_error(request, shape, refusal, message)
        self.record_refusal(refusal, fields or {})

    def record_refusal(self, refusal: Refusal, fields: Mapping[str, Any]) -> None:
        """Log and count a refusal navtwist made itself: one request record, like an exchange's."""
        now = self._clock.seconds()
        record = refusal_record(fields, refusal, now, now)
        log_request(record)
        if self.extensions.metrics is not None:
            self.extensions.metrics.request_finished(record)

    def forward(self, request: Request, protocol: str, routes: Sequence[Route], body: bytes | None, document: object) -> None:
        """Run the request hooks, then send C{request} to the first of C{routes}
        that answers and relay its answer."""
        extensions = self.extensions
        info = InferenceRequest(protocol, routes[0].name, client_model(document), document)
        refusal = run_request_hooks(extensions.hooks, info)
        if refusal is not None:
            self.refuse(request, refusal, fields={"protocol": protocol, "client_model": info.client_model})
            return
        streaming = (isinstance(info.document, dict) and info.document.get("stream") is True
                     and request.path != COUNT_TOKENS_PATH)
        shape = errors.refusal_shape((request.method, request.path), request.requestHeaders)

        def fail(failure: Failure, timed_out: bool) -> str:
            cause = classify(failure, timed_out)
            if cause is Cause.BUSY:
                request.responseHeaders.setRawHeaders(b"retry-after", [b"1"])
            refusal = parent_refusal(failure) or errors.upstream_refusal(cause)
            named = f"{refusal.message}: {describe(failure, timed_out)}" if cause.is_upstream_error else None
            errors.write_error(request, shape, refusal, refused_answer(failure) or named)
            return refusal.code

        def observe(is_sse: bool) -> Observation:
            return Observation(info, is_sse, self._clock.seconds, extensions.observers, extensions.metrics)

        exchange = Exchange(
            request,
            self._clock,
            fail,
            stream_error=partial(errors.stream_error_event, protocol),
            keep_length=protocol not in STREAMING_PROTOCOLS,
            fields={"protocol": protocol, "client_model": info.client_model},
            streaming=streaming,
            observe=observe,
            listener=None if extensions.metrics is None else MetricsListener(extensions.metrics),
        )
        exchange.start([self._attempt(request, route, info, body) for route in routes])

    def _attempt(self, request: Request, route: Route, info: InferenceRequest, body: bytes | None) -> Attempt:
        """How to call C{route} for this request (the body is replayed per candidate)."""
        model = upstream_model(route, info.client_model)
        provider = get_provider(route.provider_type)
        headers = upstream_headers(request.requestHeaders, provider, route.api_key, info.headers)
        url = provider.url(route.endpoint, request.uri)
        data = body_for(body, info.document, model)
        client = self._clients(route)

        def send() -> Deferred:
            return client.request(
                request.method.decode("ascii"), url, headers=headers, data=data, unbuffered=True, allow_redirects=False
            )

        return Attempt(
            send=send,
            deadlines=Deadlines(route.first_byte_timeout, route.idle_timeout, self._write_stall_timeout,
                                route.total_timeout),
            fields={"route": route.name, "upstream_model": model},
            fallback_on=frozenset(route.fallback_on),
            heartbeat=route.heartbeat,
            gate=self._gates[route],
            secrets=(route.api_key.encode("utf-8"),) if route.api_key else (),
        )
