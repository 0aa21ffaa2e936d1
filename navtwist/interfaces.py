"""The zope.interface contracts navtwist is extended through, and the reactor types it is given."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IPushProducer,
    IReactorCore,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    ITLSTransport,
)
from twisted.web.http_headers import Headers
from zope.interface import Attribute, Interface

from navtwist.outcome import Refusal


# Static types only: every Twisted reactor provides these, but nothing declares
# the combinations, so never ask them providedBy.
class IServiceReactor(IReactorCore, IReactorTime, IReactorFromThreads):
    """The reactor as the twistd services use it: run, stop, time, signals handed over from a handler."""


class IProxyReactor(IServiceReactor, IReactorTCP, IReactorPluggableNameResolver):
    """The reactor the whole proxy is given: the services' and what dialing (TCP, name resolution) needs."""


class IStreamTransport(ITLSTransport, IPushProducer, IConsumer):
    """A TCP connection's transport as the proxy drives it: TLS, half-close, abort, flow control both ways."""

    disconnecting: bool  # loseConnection() was called; the connection is going away
    protocol: IProtocol  # what the bytes go to (after startTLS, the TLS layer)


class IDrainCut(Interface):
    """A request's response in flight, as a graceful stop reaches it at its deadline
    (the request's component: C{request.getComponent(IDrainCut)})."""

    def drain_cut() -> bool:
        """End the response now because the proxy is shutting down, as cleanly as its
        framing allows; False when this one cannot be ended so (the caller aborts it)."""


@dataclass(eq=False)  # compared and hashed by identity: observers may key state on it
class InferenceRequest:
    """What request hooks see and may change, and what observers are told about."""

    protocol: str
    route: str
    client_model: str | None
    document: Any  # the parsed JSON body (mutable); None without a body
    headers: Headers = field(default_factory=Headers)  # extra headers for the upstream


class IProviderProfile(Interface):
    """How one kind of upstream expects to be called: its auth style and headers.

    A new vendor is a new profile, not a change to the router.
    """

    name = Attribute("The C{provider_type} value that selects this profile (str).")
    passthrough_headers = Attribute(
        "Lower-case header names (bytes) forwarded from the client besides the "
        "common allowlist, e.g. b'anthropic-version'."
    )
    default_headers = Attribute(
        "Sequence of (name, value) bytes pairs added when the client sent no such header."
    )

    def auth_headers(api_key: str) -> list[tuple[bytes, bytes]]:
        """The header pairs that carry C{api_key} to the upstream."""

    def url(endpoint: str, uri: bytes) -> bytes:
        """The upstream URL for request-target C{uri} on a route's C{endpoint}."""


class IRequestHook(Interface):
    """Sees each inference request before it goes upstream; may change or refuse it.

    Enabled by name in the config's C{plugins:} list.
    """

    name = Attribute("The name that enables this hook in C{plugins:} (str).")

    def before_upstream(request: InferenceRequest) -> Refusal | None:
        """Inspect or change C{request}, a L{InferenceRequest}
        (protocol, route, client_model, mutable JSON C{document}, mutable
        extra upstream C{headers}).  Return None to go on, or a
        L{navtwist.outcome.Refusal} (status, code, message) to answer the
        client with it instead, in its SDK's error shape.  An exception is
        logged and answered with a 500.
        """


class IStreamObserver(Interface):
    """Watches responses as they are relayed: for auditing and custom metrics.

    Methods must not block and must not keep chunks: they see every byte of
    every response.  An exception is logged and the response goes on.
    Enabled by name in the config's C{plugins:} list.
    """

    name = Attribute("The name that enables this observer in C{plugins:} (str).")

    def response_started(info: InferenceRequest) -> None:
        """The response head went out; C{info} is the request's L{InferenceRequest}."""

    def chunk(info: InferenceRequest, data: bytes) -> None:
        """C{data} was just written to the client (read-only)."""

    def response_ended(info: InferenceRequest, record: Mapping[str, Any]) -> None:
        """The exchange is over; C{record} is its usage record (a mapping)."""
