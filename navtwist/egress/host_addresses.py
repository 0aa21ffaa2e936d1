"""This host's own addresses, for the SSRF guard.

An allowed name that resolves to one of them leads back into this host: to
navtwist itself (a proxy loop), its admin port, or any service bound to
0.0.0.0 or ::.  They are read from the kernel when asked (so addresses added
later count), from C{/proc/net/fib_trie} (every local IPv4 address, secondary
ones included) and C{/proc/net/if_inet6}, and kept for at most C{ttl} seconds.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from navtwist.egress.policy import IPAddress

log = Logger(namespace="navtwist.egress")

FIB_TRIE = Path("/proc/net/fib_trie")
IF_INET6 = Path("/proc/net/if_inet6")


def parse_fib_trie(text: str) -> set[ipaddress.IPv4Address]:
    """The addresses marked C{/32 host LOCAL}: the line after each C{|-- address} line."""
    found: set[ipaddress.IPv4Address] = set()
    last: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            last = stripped[4:]
        elif last is not None and stripped.startswith("/32 host LOCAL"):
            found.add(ipaddress.IPv4Address(last))
    return found


def parse_if_inet6(text: str) -> set[ipaddress.IPv6Address]:
    """The first column of each line: an address as 32 hex digits."""
    return {ipaddress.IPv6Address(int(line.split()[0], 16)) for line in text.splitlines() if line.strip()}


def read_host_addresses(fib_trie: Path = FIB_TRIE, if_inet6: Path = IF_INET6) -> frozenset[IPAddress]:
    """Every address of every interface, as the kernel lists them now.

    A table that cannot be read (no IPv6, not Linux) contributes nothing;
    loopback and private ranges stay internal whatever this returns.
    """
    found: set[IPAddress] = set()
    for path, parse in ((fib_trie, parse_fib_trie), (if_inet6, parse_if_inet6)):
        try:
            found |= parse(path.read_text(encoding="ascii"))
        except (OSError, ValueError) as e:
            log.debug("cannot read {path}: {error}", path=str(path), error=e)
    return frozenset(found)


class HostAddresses:
    """This host's addresses, re-read at most every C{ttl} seconds (a routing
    table can be large; a connection burst must not re-read it per dial)."""

    def __init__(self, clock: IReactorTime, ttl: float = 1.0,
                 read: Callable[[], frozenset[IPAddress]] = read_host_addresses) -> None:
        self._clock = clock
        self._ttl = ttl
        self._read = read
        self._addresses: frozenset[IPAddress] = frozenset()
        self._read_at: float | None = None

    def __call__(self) -> frozenset[IPAddress]:
        now = self._clock.seconds()
        if self._read_at is None or now - self._read_at >= self._ttl or now < self._read_at:
            self._addresses = self._read()
            self._read_at = now
        return self._addresses
