"""Deciding and dialling destinations for tunnels and forwarded requests.

Order matters for safety: normalise the name, check the allow-list, resolve,
refuse if any answer is an internal address (unless the policy names that IP
literally), then dial exactly the address that was checked, so a second DNS
answer can never move the connection somewhere else (no rebinding window).
"""
from __future__ import annotations

import ipaddress
from typing import Callable, NoReturn

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectError, DNSLookupError, TCPTimedOutError, TimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from navtwist.config import UpstreamProxy
from navtwist.outcome import Refusal
from navtwist.egress.host_addresses import HostAddresses
from navtwist.interfaces import IProxyReactor
from navtwist.egress.policy import IPAddress, Policy, check_resolved, is_localhost_name, normalize_host, parse_ip
from navtwist.intercept.rules import InterceptEntry
from navtwist.upstream.endpoints import upstream_endpoint
from navtwist.upstream.parent import parent_refusal
from navtwist.upstream.descriptors import DescriptorWatch, watched


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects one name's resolved addresses into a Deferred."""

    def __init__(self) -> None:
        self.addresses: list[IPAddress] = []
        self.done: Deferred[list[IPAddress]] = Deferred()

    def resolutionBegan(self, resolution: object) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        assert isinstance(address, (IPv4Address, IPv6Address)), address  # asked for TCP addresses
        self.addresses.append(ipaddress.ip_address(address.host.split("%", 1)[0]))

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(self.addresses)


class Egress:
    """Policy, resolution and dialling, with a deadline on each step; C{descriptors} records
    connects that fail for want of a file descriptor."""

    def __init__(
        self,
        reactor: IProxyReactor,
        clock: IReactorTime,
        resolver: IHostnameResolver,
        policy: Policy[InterceptEntry],
        connect_timeout: float,
        parent: UpstreamProxy | None = None,
        own_addresses: Callable[[], frozenset[IPAddress]] | None = None,
        descriptors: DescriptorWatch | None = None,
    ) -> None:
        """C{own_addresses} gives this host's interface addresses, asked at each
        check (by default read from the kernel, at most once a second)."""
        self._reactor = reactor
        self._parent = parent
        self._descriptors = descriptors
        self._clock = clock
        self._resolver = resolver
        self.policy = policy
        self._connect_timeout = connect_timeout
        self._own_addresses = own_addresses if own_addresses is not None else HostAddresses(clock)

    def destination(self, host: str, port: int, label: str, intercepted: bool = False) -> Deferred[IPAddress]:
        """The one address to dial for C{host:port}, or an L{Refusal} failure.

        C{label} names the request in refusals, e.g. C{"CONNECT h:443"}.
        C{intercepted} destinations are permitted by their C{policy.intercept}
        entry instead of C{policy.allow}; the SSRF guard is the same.
        """
        try:
            name = normalize_host(host)
        except ValueError as e:
            return fail(Refusal(400, "bad_request", str(e)))
        permitted = self.policy.intercept_for(name, port) is not None if intercepted else self.policy.allows(name, port)
        if not permitted:
            return fail(Refusal(403, "policy_denied", f"{label} not permitted by policy"))
        literal = parse_ip(name)
        if literal is not None:
            # The entry that permitted it names this IP literally: that is the exemption.
            return succeed(literal)
        if is_localhost_name(name):
            # Never resolved: a DNS server's answer must not take a loopback name off loopback.
            return fail(Refusal(403, "ssrf_denied", f"{name} is a loopback name"))
        receiver = _Addresses()
        self._resolver.resolveHostName(receiver, name, port)
        deadline = self._clock.callLater(self._connect_timeout, receiver.done.cancel)
        result = receiver.done.addBoth(_stop_timer, deadline)
        return result.addCallbacks(
            self._checked, self._unresolved, callbackArgs=(name, port, intercepted), errbackArgs=(name,))

    def _checked(self, addresses: list[IPAddress], name: str, port: int, intercepted: bool) -> IPAddress:
        if not addresses:
            raise Refusal(502, "upstream_unreachable", f"cannot resolve {name}")
        address, reason = check_resolved(self.policy, addresses, port, intercepted, self._own_addresses())
        if address is None:
            raise Refusal(403, "ssrf_denied", f"{name} resolves to a {reason} address")
        return address

    @staticmethod
    def _unresolved(failure: Failure, name: str) -> Failure:
        if failure.check(Refusal):
            return failure
        if failure.check(DNSLookupError):
            raise Refusal(502, "upstream_unreachable", f"cannot resolve {name}")
        raise Refusal(504, "upstream_timeout", f"resolving {name} timed out")

    def connect(self, address: IPAddress, port: int, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Dial exactly C{address} (through the parent proxy, if any, naming C{address}); failures become L{Refusal}."""
        endpoint = upstream_endpoint(self._reactor, str(address), port, self._connect_timeout, self._parent)
        return watched(endpoint, self._descriptors).connect(factory).addErrback(_dial_failed)


def _dial_failed(failure: Failure) -> NoReturn:
    refusal = parent_refusal(failure)
    if refusal is not None:
        raise refusal
    if failure.check(TimeoutError, TCPTimedOutError):
        raise Refusal(504, "upstream_timeout", "connecting to the destination timed out")
    failure.trap(ConnectError)
    raise Refusal(502, "upstream_unreachable", "cannot connect to the destination")


def _stop_timer(result: object, call: IDelayedCall) -> object:
    if call.active():
        call.cancel()
    return result
