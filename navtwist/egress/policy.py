"""The egress allow-list, and the check on where an allowed name resolves to.

The proxy is the sandbox's security boundary, so the policy denies by
default: a connection is allowed only if a C{policy.allow} entry names its
host and port.  Hosts are compared in one normal form (L{normalize_host}) so
that case, a trailing dot or Unicode spelling cannot sneak a host past an
entry, and IP addresses written in the lenient forms some resolvers accept
("127.1", "0x7f.0.0.1") are refused outright rather than read as names.

An allowed name is not enough: its DNS answer may point inside the sandbox's
network (SSRF, DNS rebinding).  L{check_resolved} refuses a name if any of its
addresses is internal (L{internal_reason}), unless the policy lists that very
address as an IP literal.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Collection, Generic, Protocol, Sequence, TypeVar

# A dependency of hyperlink, which Twisted requires.  Unlike the stdlib
# "idna" codec (IDNA 2003) it implements IDNA 2008 with UTS 46 mapping, as
# curl and browsers do, so "faß.de" becomes the name they would look up.
import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
# WHATWG URL's "ends in a number": a last label like this makes resolvers and
# browsers read the whole name as an IPv4 address in some lenient form.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT = re.compile(r"[0-9]{1,5}")


def normalize_host(host: str) -> str:
    """The form in which hosts are compared: lower-case A-labels without a
    trailing dot, or an IP address in canonical form (IPv6 without brackets).

    @raise ValueError: for anything that is not a plain DNS name or IP literal,
        including ambiguous IPv4 forms such as C{"127.1"} or C{"2130706433"}.
    """
    if host.startswith("[") or ":" in host:
        ip = parse_ip(host)
        if not isinstance(ip, ipaddress.IPv6Address):
            raise _bad_host(host, "not a valid IPv6 address")
        return ip.compressed
    name = host.lower() if host.isascii() else _to_a_labels(host)
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise _bad_host(host, "empty name")
    if len(name) > 253:
        raise _bad_host(host, "name longer than 253 characters")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise _bad_host(host, "empty label")
        if len(label) > 63:
            raise _bad_host(host, "label longer than 63 characters")
        bad = set(label) - _HOST_CHARS
        if bad:
            raise _bad_host(host, f"invalid character {min(bad)!r}")
        if label[0] == "-" or label[-1] == "-":
            raise _bad_host(host, "label starts or ends with '-'")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            return ipaddress.IPv4Address(name).compressed
        except ValueError:
            raise _bad_host(host, "ambiguous IP address form (write IPv4 as a plain dotted quad)") from None
    return name


def parse_ip(host: str) -> IPAddress | None:
    """The address if C{host} is a strict IP literal: a dotted quad, or IPv6
    with or without brackets.  Anything else, lenient IPv4 forms included,
    gives None, so pass hosts through L{normalize_host} first.
    """
    bracketed = host.startswith("[") and host.endswith("]")
    text = host[1:-1] if bracketed else host
    if "%" in text:  # a zone ID names an interface, never a remote host
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return None if bracketed and ip.version == 4 else ip


def _to_a_labels(host: str) -> str:
    """UTS 46 mapping (case, width, Unicode dots), then IDNA 2008 per label;
    ASCII labels are left for L{normalize_host} to check, as IDNA forbids '_'."""
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        return ".".join(label if label.isascii() else idna.alabel(label).decode("ascii") for label in mapped.split("."))
    except UnicodeError as exc:  # idna.IDNAError and codec errors alike
        raise _bad_host(host, f"not a valid internationalized name ({exc})") from None


def _bad_host(host: str, reason: str) -> ValueError:
    return ValueError(f"invalid host {host!r}: {reason}")


@dataclass(frozen=True)
class AllowRule:
    """One C{policy.allow} entry.

    C{host} is normalized; for a wildcard entry it is the suffix after C{"*."},
    for an IP-literal entry the address in canonical form.  C{port} None means
    any port.
    """

    host: str
    wildcard: bool
    port: int | None
    ip: IPAddress | None

    def matches(self, host: str, port: int) -> bool:
        """Whether this entry allows C{host} (already normalized) on C{port}.

        Hostname entries never match an IP literal and IP entries never match
        a name: an address is reachable only by being listed as one.
        """
        if self.port is not None and port != self.port:
            return False
        ip = parse_ip(host)
        if self.ip is not None or ip is not None:
            # An IPv4 address and its ::ffff: form are one address.
            return ip is not None and self.ip is not None and unmapped(ip) == unmapped(self.ip)
        if self.wildcard:
            # One or more whole labels before the suffix, never the bare suffix.
            return host.endswith("." + self.host)
        return host == self.host


class InterceptTarget(Protocol):
    """What the egress policy needs of a C{policy.intercept} entry
    (L{navtwist.intercept.rules.InterceptEntry} holds the rest).  Read-only:
    the entries are frozen."""

    @property
    def host(self) -> str: ...
    @property
    def wildcard(self) -> bool: ...
    @property
    def ip(self) -> IPAddress | None: ...
    @property
    def port(self) -> int: ...

    def matches(self, host: str, port: int) -> bool: ...


# The entries' type: config fills them with L{navtwist.intercept.rules.InterceptEntry}.
_Entry = TypeVar("_Entry", bound=InterceptTarget, covariant=True)


@dataclass(frozen=True)
class Policy(Generic[_Entry]):
    """The allow-list and the intercepted hosts; the empty policy allows nothing."""

    rules: tuple[AllowRule, ...] = ()
    intercept: tuple[_Entry, ...] = ()

    @classmethod
    def parse(cls, entries: Sequence[object], path: str = "policy.allow") -> Policy[_Entry]:
        """Parse C{"host:port"} entries (port C{"*"}: any port).

        @raise ValueError: naming the entry, e.g. C{"policy.allow[2]: ..."}.
        """
        rules = []
        for i, entry in enumerate(entries):
            try:
                rules.append(_rule(entry))
            except ValueError as exc:
                raise ValueError(f"{path}[{i}]: {exc}") from None
        return cls(tuple(rules))

    def allows(self, host: str, port: int) -> bool:
        """Whether a connection to C{host}, as the client wrote it, on C{port} is
        allowed.  A host that cannot be normalized is refused; the caller
        should connect to L{normalize_host}C{(host)}, the name that was checked.
        """
        try:
            name = normalize_host(host)
        except ValueError:
            return False
        return any(rule.matches(name, port) for rule in self.rules)

    def names_ip(self, ip: IPAddress, port: int, intercepted: bool = False) -> bool:
        """Whether an IP-literal entry lists exactly C{ip} with a matching port:
        the only way an internal address may be dialled.  For an intercepted
        destination the entry is a C{policy.intercept} one, else a C{policy.allow}
        one (an allowed name resolving to an intercepted address stays refused:
        it would be an uninspected tunnel)."""
        if intercepted:
            name = canonical_host(ip.compressed)
            return any(entry.ip is not None and entry.matches(name, port) for entry in self.intercept)
        # Only IP-literal entries can match a host that is an address (mapped or not: see AllowRule.matches).
        return self.allows(ip.compressed, port)

    def intercept_for(self, host: str, port: int) -> _Entry | None:
        """The C{policy.intercept} entry whose rules govern C{host}, as the
        client wrote it, on C{port}, or None.  Config validation keeps the
        intercepted and the allowed hosts apart; ask this before L{allows}."""
        return find_entry(self.intercept, host, port)


def unmapped(ip: IPAddress) -> IPAddress:
    """C{ip}, or the IPv4 address an IPv4-mapped IPv6 address (C{::ffff:1.2.3.4}) stands for."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_localhost_name(name: str) -> bool:
    """A name under C{localhost} (RFC 6761 6.3): loopback by definition, whatever a
    DNS server would answer for it; C{name} is normalised.  C{localhost} itself is
    resolved (from the hosts file) and checked like any name."""
    return name.endswith(".localhost")


def canonical_host(host: str) -> str:
    """C{host} as intercept entries are compared: L{normalize_host}, and an
    IPv4-mapped IPv6 address (C{::ffff:1.2.3.4}) as its IPv4 address.

    @raise ValueError: for a host that cannot be normalised.
    """
    name = normalize_host(host)
    ip = parse_ip(name)
    return name if ip is None else unmapped(ip).compressed


_Target = TypeVar("_Target", bound=InterceptTarget)


def find_entry(entries: Sequence[_Target], host: str, port: int) -> _Target | None:
    """The entry for C{host} (as the client wrote it) on C{port}, or None.

    An exact name beats a wildcard, and a longer wildcard suffix a shorter
    one.  A host that cannot be normalised matches nothing.
    """
    try:
        name = canonical_host(host)
    except ValueError:
        return None
    best = None
    for entry in entries:
        if entry.matches(name, port):
            if not entry.wildcard:
                return entry
            if best is None or len(entry.host) > len(best.host):
                best = entry
    return best


def _rule(entry: object) -> AllowRule:
    if not isinstance(entry, str):
        raise ValueError(f"expected a string like 'host:443', got {type(entry).__name__}")
    host, colon, port_text = entry.rpartition(":")
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if not colon or (name.startswith("[") and not name.endswith("]")):
        raise ValueError(f"{entry!r}: missing port (write 'host:port' or 'host:*')")
    if ":" in name and not name.startswith("["):
        raise ValueError(f"{entry!r}: write an IPv6 address in brackets, as in '[::1]:443'")
    if "*" in name:
        raise ValueError(f"{entry!r}: '*' is allowed only as the whole first label, as in '*.example.com:443'")
    name = normalize_host(name)
    ip = parse_ip(name)
    if wildcard and ip is not None:
        raise ValueError(f"{entry!r}: a wildcard cannot be combined with an IP address")
    if wildcard and "." not in name:
        raise ValueError(f"{entry!r}: too broad: a wildcard needs a suffix of at least two labels, as in '*.example.com'")
    return AllowRule(host=name, wildcard=wildcard, port=_port(entry, port_text), ip=ip)


def _port(entry: str, text: str) -> int | None:
    if text == "*":
        return None
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{entry!r}: port must be '*' or a number from 1 to 65535")
    return int(text)


# Explicit tables rather than ipaddress's is_private & co., whose lists take
# in documentation ranges and change between Python versions.  First match
# wins, so the more specific networks come first.
def _networks(*rows: tuple[str, str]) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...]:
    return tuple((ipaddress.ip_network(network), reason) for network, reason in rows)


_INTERNAL_V4 = _networks(
    ("0.0.0.0/32", "unspecified"),
    ("0.0.0.0/8", "reserved"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("168.63.129.16/32", "metadata"),  # Azure WireServer
    ("169.254.0.0/16", "link-local"),  # incl. 169.254.169.254, cloud metadata
    ("172.16.0.0/12", "private"),
    ("192.0.0.192/32", "metadata"),  # Oracle Cloud metadata
    ("192.168.0.0/16", "private"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # incl. 255.255.255.255, broadcast
)
_INTERNAL_V6 = _networks(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "private"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "reserved"),  # deprecated site-local
    ("ff00::/8", "multicast"),
)
# IPv4-mapped, IPv4-translated, IPv4-compatible and NAT64: the IPv4 address is the low 32 bits.
_EMBED_LOW_32 = tuple(ipaddress.IPv6Network(n) for n in ("::ffff:0:0/96", "::ffff:0:0:0/96", "::/96", "64:ff9b::/96"))


def internal_reason(ip: IPAddress, own: Collection[IPAddress] = ()) -> str | None:
    """Why C{ip} must not be dialled unless listed literally ("loopback",
    "private", "link-local", "cgnat", "metadata", "multicast", "unspecified",
    "reserved", or "this-host": one of C{own}, this host's interface
    addresses), or None for a public address.

    An IPv6 address embedding an IPv4 one (mapped, translated, compatible,
    NAT64, 6to4, Teredo's client) is judged by the IPv4 address, which is
    where it leads.
    """
    for network, reason in _INTERNAL_V4 if ip.version == 4 else _INTERNAL_V6:
        if ip in network:
            return reason
    if ip in own:
        return "this-host"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.sixtofour
        if embedded is None and ip.teredo is not None:
            embedded = ip.teredo[1]  # the client: the low 32 bits, inverted
        if embedded is None and any(ip in network for network in _EMBED_LOW_32):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
        if embedded is not None:
            return internal_reason(embedded, own)
    return None


def check_resolved(
    policy: Policy, addresses: Sequence[IPAddress], port: int, intercepted: bool = False,
    own: Collection[IPAddress] = (),
) -> tuple[IPAddress | None, str | None]:
    """The address to dial for an allowed name, or None and why not.

    One internal address in the answer refuses the whole name, so a DNS
    answer mixing public and internal addresses (rebinding) gets nowhere;
    internal addresses the policy lists literally are exempt.  C{own} are this
    host's addresses (internal on every port, like loopback).  The caller
    dials exactly the address returned.  An empty answer gives "no addresses".
    """
    for address in addresses:
        reason = internal_reason(address, own)
        if reason is not None and not policy.names_ip(address, port, intercepted):
            return None, reason
    if not addresses:
        return None, "no addresses"
    return addresses[0], None
