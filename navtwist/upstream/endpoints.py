"""How the proxy's HTTP clients dial: IP literals directly, names through the resolver.

Twisted's Agent dials every URL through a HostnameEndpoint, which resolves
even C{127.0.0.1} with getaddrinfo in the reactor's thread pool; local
upstreams (vLLM, Ollama) and forwarded requests (already pinned to the
address the egress policy checked) skip that round trip.
"""
from __future__ import annotations

import ipaddress

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import BrowserLikePolicyForHTTPS, URI
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from navtwist.upstream.descriptors import DescriptorWatch, watched


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """Endpoints for an Agent, each with C{connect_timeout}; https is verified by C{tls}.

    Connects that fail for want of a descriptor are recorded by C{descriptors}.
    """

    def __init__(self, reactor: object, connect_timeout: float, tls: IPolicyForHTTPS | None = None,
                 descriptors: DescriptorWatch | None = None) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = tls or BrowserLikePolicyForHTTPS()
        self._descriptors = descriptors

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        else:
            kind = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = kind(self._reactor, host, uri.port, timeout=self._timeout)
        endpoint = watched(endpoint, self._descriptors)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint
