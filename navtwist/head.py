"""Parsing of the first request head a client sends to the proxy.

Strict on purpose: the proxy is the sandbox's security boundary, so anything
ambiguous is refused rather than interpreted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")
_HOST = re.compile(r"^[a-z0-9]([a-z0-9\-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]*[a-z0-9])?)*$")


class BadHead(ValueError):
    """The request head cannot be parsed; the message is safe to show the client."""


@dataclass(frozen=True)
class ProxyHead:
    """The parsed first request a client sends to the proxy."""

    method: bytes
    target: bytes
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]


def parse_head(head: bytes) -> ProxyHead:
    """Parse a request head (without its final blank line), strictly.

    @raise BadHead: malformed request line or header line.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1] or not _VERSION.match(parts[2]):
        raise BadHead("malformed request line")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise BadHead("malformed header line")
        value = value.strip(b" \t")
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise BadHead("invalid character in header value")
        headers.append((name.lower(), value))
    return ProxyHead(parts[0], parts[1], parts[2], tuple(headers))


def parse_authority(target: bytes) -> tuple[str, int]:
    """Split a CONNECT target C{host:port} (IPv6 in brackets); the host is normalised.

    @raise BadHead: not a host:port authority.
    """
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise BadHead("CONNECT target is not ASCII") from None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadHead("CONNECT target must be host:port")
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1].lower(), int(port)
    host = host.lower().rstrip(".")
    if not _HOST.match(host):
        raise BadHead("CONNECT target has an invalid host name")
    return host, int(port)
