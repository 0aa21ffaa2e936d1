"""Listen endpoint strings read before anything listens: what address each would bind.

A leaf (it uses a MemoryReactor, never the real one), so the config can check
C{listen} and C{admin_listen} when it is loaded, before the CA is made.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure


EXAMPLE = "tcp:3128:interface=127.0.0.1"
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})
_TCP_TYPES = frozenset({"tcp", "tcp6", "ssl"})
_CHECKABLE = (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint, UNIXServerEndpoint)


@dataclass(frozen=True)
class ListenAddress:
    """What an endpoint string binds, as far as it is known before listening."""

    kind: str  # "tcp" (also tcp6 and ssl) or "unix"
    host: str = ""  # the interface; "" is every IPv4 address
    port: int = 0
    path: str = ""  # unix sockets

    def __str__(self) -> str:
        if self.kind == "unix":
            return self.path
        host = self.host or "0.0.0.0"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def parse_listen(description: str) -> ListenAddress | None:
    """The address server endpoint string C{description} would bind.

    None for an endpoint whose address only listening reveals: a socket
    inherited from systemd (C{systemd:...}), which cannot be looked up before
    systemd passes it, or another plugin's endpoint type.

    @raise ValueError: one line saying what is wrong and how to write it.
    """
    reactor = MemoryReactor()  # records what would be bound, binds nothing
    try:
        endpoint = serverFromString(reactor, description)
        # Only these are known to bind nothing here: listening on an adopted
        # socket, for one, closes the descriptor systemd passed.
        if not isinstance(endpoint, _CHECKABLE):
            return None
        listening = endpoint.listen(Factory())
    except Exception as exc:
        if _type(description) == "systemd" and isinstance(exc, (IndexError, KeyError)):
            return None  # no such inherited socket (yet): known only once systemd starts navtwist
        raise ValueError(explain_endpoint(description, exc)) from None
    failures: list[Failure] = []
    listening.addErrback(failures.append)
    if failures:
        error = failures[0].value
        raise ValueError(explain_endpoint(description, error if error is not None else RuntimeError("failed")))
    if reactor.tcpServers or reactor.sslServers:
        port, interface = _port_and_interface(reactor)
        if not 0 <= port <= 65535:
            raise ValueError(f"{description!r}: port {port} is out of range (0-65535)")
        return ListenAddress("tcp", host=interface, port=port)
    if reactor.unixServers:
        return ListenAddress("unix", path=os.path.abspath(reactor.unixServers[0][0]))
    return None


def _port_and_interface(reactor: MemoryReactor) -> tuple[int, str]:
    if reactor.tcpServers:
        port, _factory, _backlog, interface = reactor.tcpServers[0]
    else:
        port, _factory, _context, _backlog, interface = reactor.sslServers[0]
    return port, interface


def explain_endpoint(description: str, error: BaseException) -> str:
    """Why C{description} is not a usable server endpoint string, with an example of one."""
    kind = _type(description)
    fix = f"write e.g. {EXAMPLE}"
    if description.strip().isdigit():
        return f"{description!r} is a bare port, not an endpoint string; write e.g. tcp:{description.strip()}:interface=127.0.0.1"
    if kind == "systemd" and isinstance(error, (IndexError, KeyError)):
        return (f"{description!r}: systemd passed no such socket; start navtwist through its .socket unit "
                f"(docs/service.md), or listen on a tcp: endpoint")
    if kind in _TCP_TYPES:
        port = description.split(":")[1] if description.count(":") else ""
        if not port.strip().isdigit():
            return f"{description!r}: port {port!r} is not a number; {fix}"
        if isinstance(error, TypeError) and "interface" in str(error):
            return (f"{description!r}: escape each ':' of an IPv6 interface with a backslash, "
                    r"e.g. tcp6:3128:interface=\:\:1")
    if isinstance(error, ValueError) and str(error).startswith("Unknown endpoint type"):
        return f"{description!r}: unknown endpoint type {kind!r}; {fix} (or unix:PATH, systemd:domain=INET:index=0)"
    unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if unknown:
        return f"{description!r}: unknown parameter {unknown[1]!r}; {fix}"
    reason = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        reason = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return f"{description!r} is not a usable endpoint string ({reason}); {fix}"


def _type(description: str) -> str:
    return description.split(":", 1)[0].strip().lower()


def same_address(a: ListenAddress | None, b: ListenAddress | None) -> bool:
    """Whether binding both would collide: one port on overlapping interfaces, or one socket path.

    Port 0 (a port the system picks) never collides.
    """
    if a is None or b is None or a.kind != b.kind:
        return False
    if a.kind == "unix":
        return a.path == b.path
    overlap = a.host == b.host or a.host in _WILDCARDS or b.host in _WILDCARDS
    return a.port == b.port != 0 and overlap
