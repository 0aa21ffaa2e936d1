"""Where navtwist listens: endpoint strings checked when the config is read,
a failure to listen told in one line with its fix, and the bound address logged.

A proxy that injects API keys must say plainly where it can be reached, and
an operator who mistypes C{listen} or starts it twice deserves the reason and
the fix, not a traceback from Twisted's endpoint parser.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="navtwist")

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
        raise ValueError(explain_endpoint(description, failures[0].value))
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


def listen_problem(key: str, description: str, error: BaseException) -> str:
    """One line: why listening on C{description} (config key C{key}) failed, and the fix."""
    address = _parse_quietly(description)
    where = f"{address} ({key}: {description})" if address is not None else f"{key} {description!r}"
    cause: BaseException = getattr(error, "socketError", None) or error
    code = getattr(cause, "errno", None)
    other = f"choose another {key}" + (" (or pass --listen)" if key == "listen" else "")
    if isinstance(cause, socket.gaierror):
        reason, fix = "the interface name does not resolve", "use an IP address of this host, e.g. 127.0.0.1"
    elif code == errno.EADDRINUSE:
        reason, fix = "the address is already in use", f"stop the process listening there, or {other}"
    elif code in (errno.EACCES, errno.EPERM) and address is not None and address.kind == "tcp":
        reason, fix = "permission denied", f"ports below 1024 need root or CAP_NET_BIND_SERVICE; {other}"
    elif code == errno.EADDRNOTAVAIL:
        reason, fix = "this host has no such address", f"use one of its addresses (e.g. 127.0.0.1), or {other}"
    elif code == errno.ENOENT:
        reason, fix = "its directory does not exist", "create the directory first"
    else:
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        fix = other
    return f"navtwist: cannot listen on {where}: {reason}; {fix}"


def _parse_quietly(description: str) -> ListenAddress | None:
    try:
        return parse_listen(description)
    except ValueError:
        return None


def check_can_listen(key: str, description: str) -> None:
    """Try to bind what C{description} would, before twistd forks or writes a pidfile.

    twistd listens only after daemonizing, where a failure becomes a
    traceback (or a cut-off message from the daemon); bound here and released
    at once, the common failures (port taken, no permission, no such address
    or directory) stop start-up with one line instead.  Port 0, inherited
    sockets and other endpoint types are left to listening itself.

    @raise SystemExit: with the line from L{listen_problem}.
    """
    address = parse_listen(description)
    if address is None or (address.kind == "tcp" and address.port == 0):
        return
    try:
        if address.kind == "unix":
            directory = os.path.dirname(address.path)
            if not os.path.isdir(directory):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), directory)
            return
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's listener does
            probe.bind((address.host, address.port))
    except OSError as e:
        raise SystemExit(listen_problem(key, description, e)) from None


def is_loopback(address: Any) -> bool:
    """Whether a bound address is reachable from this host only (UNIX sockets are)."""
    if isinstance(address, UNIXAddress):
        return True
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return False
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def format_address(address: Any) -> str:
    """C{127.0.0.1:3128}, C{[::1]:3128} or a socket path."""
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return str(address)


class Listener(service.Service):
    """Listens on a server endpoint string while running.

    Unlike L{twisted.application.strports.service}, a failure to listen is one
    line naming the config key and the fix (L{SystemExit}, so twistd prints it
    and exits 1), and success logs where it listens, with the port actually
    bound (for C{tcp:0}), and a warning if other hosts can reach it.
    """

    def __init__(self, key: str, description: str, factory: IProtocolFactory, reactor: Any, label: str) -> None:
        self._key = key
        self._description = description
        self._factory = factory
        self._label = label
        try:
            self._endpoint = serverFromString(reactor, description)
        except Exception as e:
            raise SystemExit(f"navtwist: {key}: {explain_endpoint(description, e)}") from None
        self._listening: Deferred[IListeningPort] | None = None
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        # twistd binds here, before it drops privileges; startService covers other callers.
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self._listen()

    def _listen(self) -> None:
        self._problem: str | None = None
        self._starting = True
        self._listening = self._endpoint.listen(self._factory)
        self._listening.addBoth(self._listened)
        self._starting = False
        if self._problem is not None:  # failed at once, as binding a port does
            raise SystemExit(self._problem)

    def _listened(self, result: IListeningPort | Failure) -> None:
        if isinstance(result, Failure):
            if not result.check(CancelledError):
                self._problem = listen_problem(self._key, self._description, result.value)
                if not self._starting:  # an endpoint that failed later: nothing left to raise into
                    log.critical("{problem}", problem=self._problem)
            return
        self.port = result
        address = result.getHost()
        where = format_address(address)
        log.info("{label} listening on {address}", label=self._label, address=where, event="listening")
        if not is_loopback(address):
            log.warn(
                "{key} {address} is reachable from other hosts: navtwist injects API keys into the requests "
                "it relays, so no untrusted host may reach this port (bind it to 127.0.0.1 or firewall it)",
                key=self._key, address=where, event="exposed",
            )

    def stopService(self) -> Deferred[None] | None:  # type: ignore[override]
        super().stopService()
        listening, self._listening = self._listening, None
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()  # type: ignore[return-value]
        if listening is not None:
            listening.cancel()
        return None
