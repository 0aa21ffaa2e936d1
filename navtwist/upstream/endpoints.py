"""How the proxy's HTTP clients dial: IP literals directly, names through the resolver, or via the parent proxy.

Twisted's Agent dials every URL through a HostnameEndpoint, which resolves
even C{127.0.0.1} with getaddrinfo in the reactor's thread pool; local
upstreams (vLLM, Ollama) and forwarded requests (already pinned to the
address the egress policy checked) skip that round trip.  With an
C{upstream_proxy}, every upstream connection (tunnels, forwarded requests,
intercepted origins, inference routes) is made by L{upstream_endpoint}, as a
C{CONNECT} through the parent.
"""
from __future__ import annotations

import ipaddress

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import BrowserLikePolicyForHTTPS, URI
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from navtwist.interfaces import IProxyReactor
from navtwist.config import UpstreamProxy
from navtwist.upstream.parent import ParentProxyEndpoint


def tcp_endpoint(reactor: IProxyReactor, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A direct TCP endpoint: IP literals without the resolver, names with it."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
    kind = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
    return kind(reactor, host, port, timeout=timeout)


def upstream_endpoint(reactor: IProxyReactor, host: str, port: int, timeout: float,
                      parent: UpstreamProxy | None = None) -> IStreamClientEndpoint:
    """The endpoint for one upstream connection to C{host:port}: direct, or a C{CONNECT} through C{parent}.

    Callers pass the address the egress guard checked wherever there is one,
    so the parent is asked for exactly that address.
    """
    if parent is None:
        return tcp_endpoint(reactor, host, port, timeout)
    to_parent = tcp_endpoint(reactor, parent.host, parent.port, timeout)
    if parent.tls:
        to_parent = wrapClientTLS(optionsForClientTLS(parent.host), to_parent)
    return ParentProxyEndpoint(reactor, to_parent, host, port, timeout, parent.authorization)
from navtwist.upstream.descriptors import DescriptorWatch, watched


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """Endpoints for an Agent, each with C{connect_timeout}; https is verified by C{tls}.

    With C{parent}, a route's endpoint that is a name is named to the parent
    as it is: route endpoints are the operator's, like the parent (which
    often alone can resolve outside names).

    Connects that fail for want of a descriptor are recorded by C{descriptors}.
    """

    def __init__(self, reactor: IProxyReactor, connect_timeout: float, tls: IPolicyForHTTPS | None = None,
                 parent: UpstreamProxy | None = None, descriptors: DescriptorWatch | None = None) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = tls or BrowserLikePolicyForHTTPS()
        self._parent = parent
        self._descriptors = descriptors

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint = watched(
            upstream_endpoint(self._reactor, uri.host.decode("ascii"), uri.port, self._timeout, self._parent),
            self._descriptors)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint
