"""Parsing of the first request head a client sends to the proxy, and the
header rules the proxy's HTTP/1.1 channels share with it.

Strict on purpose: the proxy is the sandbox's security boundary, so anything
ambiguous is refused rather than interpreted.  Both parsers apply the same
line and framing rules (L{parse_header_line}, L{check_framing_header}), so a
head one of them accepts cannot be read differently by the other.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# fullmatch everywhere: "$" would also match before a trailing "\n".
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
# Control characters other than HTAB are invalid in a field value (RFC 9110 5.5).
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# At most 18 digits: every such number fits in a signed 64-bit integer, so no
# parser further along can wrap it around to a different, smaller length.
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}")
_HOST = re.compile(r"[a-z0-9]([a-z0-9\-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]*[a-z0-9])?)*")
_PORT = re.compile(r"[0-9]{1,5}")
_BODYLESS = (b"CONNECT", b"GET")


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

    Besides the line rules, the framing of the head must be unambiguous: at
    most one Content-Length or one Transfer-Encoding, never both, and a
    CONNECT or GET must not announce a body (Content-Length other than 0, or
    any Transfer-Encoding): bytes after such a head would be a smuggled request.

    @raise BadHead: malformed request line, header line or framing.
    """
    lines = head.split(b"\r\n")
    method, target, version = parse_request_line(lines[0])
    headers = []
    for line in lines[1:]:
        name, value = parse_header_line(line)
        check_framing_header(name, value, version)
        headers.append((name, value))
    check_host_count(sum(1 for name, _ in headers if name == b"host"), version)
    lengths = [value for name, value in headers if name == b"content-length"]
    codings = [value for name, value in headers if name == b"transfer-encoding"]
    if len(lengths) > 1 or len(codings) > 1:
        raise BadHead("duplicate Content-Length or Transfer-Encoding header")
    if lengths and codings:
        raise BadHead("Content-Length and Transfer-Encoding together")
    if method in _BODYLESS and (codings or (lengths and int(lengths[0]) != 0)):
        raise BadHead(f"a {method.decode()} request must not have a body")
    return ProxyHead(method, target, version, tuple(headers))


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """C{(method, target, version)}: single spaces, a token, visible ASCII, HTTP/1.0 or 1.1.

    @raise BadHead: anything else, e.g. extra spaces or C{http/1.1}.
    """
    parts = line.split(b" ")
    if (
        len(parts) != 3
        or not _TOKEN.fullmatch(parts[0])
        or not _TARGET.fullmatch(parts[1])
        or not _VERSION.fullmatch(parts[2])
    ):
        raise BadHead("malformed request line")
    return parts[0], parts[1], parts[2]


def check_not_folded(line: bytes) -> None:
    """Refuse obs-fold (a line starting with SP or HTAB).

    Parsers disagree on whether it continues the previous header, so it
    could hide a header (say Transfer-Encoding) from one of them.

    @raise BadHead: the line is folded.
    """
    if line.startswith((b" ", b"\t")):
        raise BadHead("obsolete line folding is not accepted")


def parse_header_line(line: bytes) -> tuple[bytes, bytes]:
    """C{(lowercased name, value without surrounding OWS)} of one header line.

    @raise BadHead: obs-fold, no colon, whitespace before the colon, a name
        that is not a token, or a control character (NUL, bare CR or LF...)
        in the value.
    """
    check_not_folded(line)
    name, colon, value = line.partition(b":")
    if not colon:
        raise BadHead("header line without a colon")
    if name.endswith((b" ", b"\t")):
        raise BadHead("whitespace between header name and colon")
    if not _TOKEN.fullmatch(name):
        raise BadHead("invalid header name")
    value = value.strip(b" \t")
    if _CTL.search(value):
        raise BadHead("invalid character in header value")
    return name.lower(), value


def check_framing_header(name: bytes, value: bytes, version: bytes) -> None:
    """Refuse a Content-Length or Transfer-Encoding that parsers could read differently.

    C{name} is lowercased and C{value} stripped of OWS, as L{parse_header_line}
    returns them; so C{"Content-Length:  5 "} is 5 (OWS is never part of a
    value, RFC 9110 5.5).  Content-Length must be 1 to 18 digits: a sign,
    hex, a comma list (even C{"5,5"}) or inner whitespace is refused.  The
    only transfer coding accepted is C{chunked} (case-insensitive, as coding
    names are), and only in HTTP/1.1.

    @raise BadHead: the value is refused.
    """
    if name == b"content-length" and not _CONTENT_LENGTH.fullmatch(value):
        raise BadHead("Content-Length must be a decimal number of at most 18 digits")
    if name == b"transfer-encoding":
        if value.lower() != b"chunked":
            raise BadHead("the only Transfer-Encoding accepted is chunked")
        if version != b"HTTP/1.1":
            raise BadHead("Transfer-Encoding requires HTTP/1.1")


def check_host_count(count: int, version: bytes) -> None:
    """RFC 9112 3.2: at most one Host header, and exactly one in HTTP/1.1.

    Two Host headers are read as different targets by different parsers.

    @raise BadHead: C{count} Host headers are refused.
    """
    if count > 1:
        raise BadHead("more than one Host header")
    if count == 0 and version == b"HTTP/1.1":
        raise BadHead("an HTTP/1.1 request must have a Host header")


def parse_authority(target: bytes) -> tuple[str, int]:
    """Split a CONNECT target C{host:port} (IPv6 in brackets); the host is normalised.

    @raise BadHead: not a host:port authority.
    """
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise BadHead("CONNECT target is not ASCII") from None
    host, sep, port = text.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise BadHead("CONNECT target must be host:port")
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1].lower(), int(port)
    host = host.lower().rstrip(".")
    if not _HOST.fullmatch(host):
        raise BadHead("CONNECT target has an invalid host name")
    return host, int(port)
