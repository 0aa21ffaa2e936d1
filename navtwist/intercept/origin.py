"""Connections from navtwist to the origins of intercepted hosts.

Each request is dialled to the address the egress guard checked, with TLS
verified for the host name the client asked for (SNI and certificate name),
against the system trust store or the entry's C{upstream_ca}.  Connections
are pooled per (host, port, address, trust): never shared between two names,
so one name's connection can never carry another name's request.
"""
from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from navtwist.compat import set_pool_factory
from navtwist.config import Limits, UpstreamProxy
from navtwist.egress.policy import IPAddress
from navtwist.interfaces import IProxyReactor
from navtwist.upstream.connection import HeadLimits, client_factory
from navtwist.upstream.endpoints import upstream_endpoint
from navtwist.upstream.descriptors import DescriptorWatch, IdleBudget, watched

# Distinct (host, port, address, trust) keys kept with an open pool; the least
# recently used one is closed beyond this.
MAX_ORIGINS = 256


def load_trust(upstream_ca: tuple[bytes, ...]) -> object:
    """The trust root for an origin: the system store, or the entry's C{upstream_ca} certificates."""
    if not upstream_ca:
        return platformTrust()
    return trustRootFromCertificates([Certificate.loadPEM(pem) for pem in upstream_ca])


@implementer(IAgentEndpointFactory)
class _PinnedEndpoints:
    """Every URI goes to one checked address, with TLS for the URI's host name."""

    def __init__(self, reactor: IProxyReactor, address: IPAddress, host: str, trust: object, timeout: float,
                 parent: UpstreamProxy | None, descriptors: DescriptorWatch | None) -> None:
        self._reactor = reactor
        self._address = address
        # Twisted names the trust root's type (IOpenSSLTrustRoot) only in its private _sslverify.
        self._tls = optionsForClientTLS(host, trustRoot=trust, acceptableProtocols=[b"http/1.1"])  # type: ignore[arg-type]
        self._timeout = timeout
        self._parent = parent
        self._descriptors = descriptors

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        tcp = upstream_endpoint(self._reactor, str(self._address), uri.port, self._timeout, self._parent)
        return wrapClientTLS(self._tls, watched(tcp, self._descriptors))


class OriginClients:
    """One Agent and connection pool per (host, port, address, trusted certificates).

    The certificates were read when the config was loaded, so a reload that
    changes an entry's C{upstream_ca} reaches new connections by itself.
    Idle connections of all pools together stay within C{idle} (the descriptor budget).
    """

    def __init__(self, reactor: IProxyReactor, connect_timeout: float, limits: Limits, idle_per_origin: int = 4,
                 parent: UpstreamProxy | None = None, descriptors: DescriptorWatch | None = None,
                 idle: IdleBudget | None = None) -> None:
        self._reactor = reactor
        self._parent = parent
        self._timeout = connect_timeout
        self._idle = idle_per_origin
        self._budget = idle or IdleBudget.for_soft_limit()
        self._descriptors = descriptors
        # Response heads capped as they arrive, socket buffers bounded: as on every upstream path.
        self._protocols = client_factory(
            HeadLimits(limits.max_response_head_bytes, limits.max_response_headers), limits.socket_buffer_bytes)
        self._agents: OrderedDict[tuple[str, int, str, tuple[bytes, ...]], tuple[IAgent, HTTPConnectionPool]] = (
            OrderedDict())

    def agent_for(self, host: str, port: int, address: IPAddress, upstream_ca: tuple[bytes, ...]) -> IAgent:
        key = (host, port, str(address), upstream_ca)
        found = self._agents.get(key)
        if found is not None:
            self._agents.move_to_end(key)
            return found[0]
        trust = load_trust(upstream_ca)
        pool = self._budget.pool(self._reactor, per_host=self._idle)
        pool.retryAutomatically = False  # a streamed body cannot be sent twice
        set_pool_factory(pool, self._protocols)
        agent = Agent.usingEndpointFactory(
            self._reactor, _PinnedEndpoints(self._reactor, address, host, trust, self._timeout, self._parent,
                                            self._descriptors), pool=pool
        )
        self._agents[key] = (agent, pool)
        while len(self._agents) > MAX_ORIGINS:
            _, (_, old) = self._agents.popitem(last=False)
            old.closeCachedConnections()
        return agent

    def connect(
        self, host: str, port: int, address: IPAddress, upstream_ca: tuple[bytes, ...], factory: IProtocolFactory
    ) -> Deferred[IProtocol]:
        """A connection of its own (not pooled: an upgrade takes it over) to the origin, over verified TLS."""
        endpoints = _PinnedEndpoints(self._reactor, address, host, load_trust(upstream_ca), self._timeout, self._parent,
                                     self._descriptors)
        return endpoints.endpointForURI(URI.fromBytes(b"https://%s:%d/" % (host.encode("ascii"), port))).connect(factory)

    def close(self) -> Deferred[list[tuple[bool, object]]]:
        pools = [pool for _, pool in self._agents.values()]
        self._agents.clear()
        return DeferredList([pool.closeCachedConnections() for pool in pools])
