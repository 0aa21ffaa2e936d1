"""Upstream dialling: IP literals skip the resolver, names use it, https is wrapped in TLS."""
from __future__ import annotations

import pytest
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI

from navtwist.upstream.endpoints import UpstreamEndpoints


@pytest.mark.parametrize("url, kind", [
    (b"http://127.0.0.1:8000/v1", TCP4ClientEndpoint),
    (b"http://[::1]:8000/v1", TCP6ClientEndpoint),
    (b"http://upstream.example:8000/v1", HostnameEndpoint),
])
def test_ip_literals_are_dialled_directly(url: bytes, kind: type) -> None:
    reactor = MemoryReactorClock()
    endpoint = UpstreamEndpoints(reactor, connect_timeout=3).endpointForURI(URI.fromBytes(url))
    assert isinstance(endpoint, kind)
    endpoint.connect(Factory.forProtocol(Protocol))
    if kind is not HostnameEndpoint:
        host, port, _, timeout, _ = reactor.tcpClients[0]
        assert (port, timeout) == (8000, 3) and host in ("127.0.0.1", "::1")


def test_https_is_wrapped_in_tls() -> None:
    endpoint = UpstreamEndpoints(MemoryReactorClock(), 3).endpointForURI(URI.fromBytes(b"https://127.0.0.1:8443/"))
    assert not isinstance(endpoint, TCP4ClientEndpoint)
    assert isinstance(endpoint._wrappedEndpoint, TCP4ClientEndpoint)
