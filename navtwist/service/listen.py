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
import socket
from typing import Any

from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="navtwist")

from navtwist.listen_address import ListenAddress, explain_endpoint, parse_listen


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
                error = result.value if result.value is not None else RuntimeError("failed")
                self._problem = listen_problem(self._key, self._description, error)
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

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        listening, self._listening = self._listening, None
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        if listening is not None:
            listening.cancel()
        return None
