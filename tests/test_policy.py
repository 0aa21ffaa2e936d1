"""Tests for navtwist.egress.policy: host normal form, allow-list matching, internal addresses."""
from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from navtwist.egress.policy import (
    AllowRule,
    IPAddress,
    Policy,
    check_resolved,
    internal_reason,
    normalize_host,
    parse_ip,
)

LONGEST_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters


@pytest.mark.parametrize(
    "host, expected",
    [
        ("example.com", "example.com"),
        ("Example.COM.", "example.com"),
        ("localhost", "localhost"),
        ("a_b.example", "a_b.example"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("a--b.example", "a--b.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("faß.de", "xn--fa-hia.de"),  # IDNA 2008, as curl and browsers; IDNA 2003 says "fass.de"
        ("ａｂｃ。example", "abc.example"),  # full-width letters and ideographic full stop
        ("1.2.3.4", "1.2.3.4"),
        ("1.2.3.4.", "1.2.3.4"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[2001:DB8:0:0::1]", "2001:db8::1"),
        (LONGEST_NAME, LONGEST_NAME),
        (LONGEST_NAME + ".", LONGEST_NAME),
    ],
)
def test_normalize_host(host: str, expected: str) -> None:
    assert normalize_host(host) == expected


@pytest.mark.parametrize(
    "host, message",
    [
        ("", "empty name"),
        (".", "empty name"),
        ("a..b", "empty label"),
        (".a", "empty label"),
        ("a.b..", "empty label"),  # only one trailing dot is stripped
        ("a" * 64 + ".com", "label longer than 63"),
        (LONGEST_NAME + "d", "name longer than 253"),
        ("ex ample.com", "invalid character ' '"),
        ("a/b.com", "invalid character '/'"),
        ("a*b.com", "invalid character '*'"),
        ("a\x00.com", "invalid character"),
        ("-a.com", "starts or ends with '-'"),
        ("a-.com", "starts or ends with '-'"),
        ("☃.com", "not a valid internationalized name"),
        ("127.1", "ambiguous IP address form"),
        ("0x7f.0.0.1", "ambiguous IP address form"),
        ("2130706433", "ambiguous IP address form"),
        ("0x7f000001", "ambiguous IP address form"),
        ("0177.0.0.1", "ambiguous IP address form"),
        ("127.0.0.01", "ambiguous IP address form"),
        ("1.2.3", "ambiguous IP address form"),
        ("1.2.3.4.5", "ambiguous IP address form"),
        ("256.1.1.1", "ambiguous IP address form"),
        ("example.0x1", "ambiguous IP address form"),
        ("[1.2.3.4]", "not a valid IPv6 address"),
        ("[::1", "not a valid IPv6 address"),
        ("1:2", "not a valid IPv6 address"),
        ("fe80::1%eth0", "not a valid IPv6 address"),
        ("[fe80::1%25eth0]", "not a valid IPv6 address"),
    ],
)
def test_normalize_host_rejects(host: str, message: str) -> None:
    with pytest.raises(ValueError, match="^invalid host ") as info:
        normalize_host(host)
    assert message in str(info.value)


@given(st.text() | st.text(alphabet="aZ09x_-.:[]%ßü。ａ"))
def test_normalize_host_raises_only_value_error_and_is_idempotent(host: str) -> None:
    try:
        name = normalize_host(host)
    except ValueError:
        return
    assert name.isascii()
    assert normalize_host(name) == name


@pytest.mark.parametrize(
    "host, expected",
    [
        ("1.2.3.4", IPv4Address("1.2.3.4")),
        ("::1", IPv6Address("::1")),
        ("[::1]", IPv6Address("::1")),
        ("[1.2.3.4]", None),
        ("127.1", None),
        ("fe80::1%eth0", None),
        ("example.com", None),
    ],
)
def test_parse_ip(host: str, expected: IPAddress | None) -> None:
    assert parse_ip(host) == expected


POLICY = Policy.parse(
    [
        "api.github.com:443",
        "*.pythonhosted.org:443",
        "pypi.org:*",
        "127.0.0.1:8080",
        "[::1]:8443",
        "bücher.example:443",
        "Mixed.Case.Example.:80",
    ]
)


@pytest.mark.parametrize(
    "host, port, allowed",
    [
        ("api.github.com", 443, True),
        ("API.GitHub.COM.", 443, True),
        ("api.github.com", 80, False),
        ("github.com", 443, False),
        ("xapi.github.com", 443, False),
        ("api.github.com.evil.com", 443, False),
        ("files.pythonhosted.org", 443, True),
        ("a.b.pythonhosted.org", 443, True),
        ("pythonhosted.org", 443, False),
        ("evilpythonhosted.org", 443, False),
        ("files.pythonhosted.org", 80, False),
        ("pythonhosted.org.evil.com", 443, False),
        ("pypi.org", 1, True),
        ("pypi.org", 65535, True),
        ("www.pypi.org", 443, False),
        ("xn--bcher-kva.example", 443, True),
        ("bücher.example", 443, True),
        ("BÜCHER.example", 443, True),
        ("mixed.case.example", 80, True),
        ("127.0.0.1", 8080, True),
        ("127.0.0.1", 80, False),
        ("127.0.0.2", 8080, False),
        ("127.1", 8080, False),
        ("localhost", 8080, False),
        ("::1", 8443, True),
        ("[::1]", 8443, True),
        ("0:0:0:0:0:0:0:1", 8443, True),
        ("::1", 8080, False),
        ("::ffff:127.0.0.1", 8080, True),  # one address with 127.0.0.1
        ("a..b", 443, False),
        ("", 443, False),
    ],
)
def test_allows(host: str, port: int, allowed: bool) -> None:
    assert POLICY.allows(host, port) is allowed


def test_empty_policy_allows_nothing() -> None:
    assert not Policy().allows("pypi.org", 443)
    assert not Policy().allows("127.0.0.1", 8080)


def test_hostname_rules_never_match_ip_hosts_and_vice_versa() -> None:
    # Rules that no entry can produce, to test the guard in matches() itself.
    assert not AllowRule(host="1.2.3.4", wildcard=False, port=None, ip=None).matches("1.2.3.4", 443)
    assert not AllowRule(host="0.0.1", wildcard=True, port=None, ip=None).matches("127.0.0.1", 443)
    ip_rule = AllowRule(host="127.0.0.1", wildcard=False, port=None, ip=IPv4Address("127.0.0.1"))
    assert ip_rule.matches("127.0.0.1", 443)
    assert not ip_rule.matches("localhost", 443)
    assert not Policy.parse(["localhost:*"]).allows("127.0.0.1", 80)


@pytest.mark.parametrize(
    "entry, rule",
    [
        ("API.github.com.:443", AllowRule("api.github.com", False, 443, None)),
        ("*.PythonHosted.org:443", AllowRule("pythonhosted.org", True, 443, None)),
        ("*.a.b.example:443", AllowRule("a.b.example", True, 443, None)),
        ("pypi.org:*", AllowRule("pypi.org", False, None, None)),
        ("10.0.0.5:8080", AllowRule("10.0.0.5", False, 8080, IPv4Address("10.0.0.5"))),
        ("[0:0::1]:8443", AllowRule("::1", False, 8443, IPv6Address("::1"))),
        ("bücher.example:1", AllowRule("xn--bcher-kva.example", False, 1, None)),
        ("h.example:65535", AllowRule("h.example", False, 65535, None)),
    ],
)
def test_parse_entry(entry: str, rule: AllowRule) -> None:
    assert Policy.parse([entry]).rules == (rule,)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("pypi.org", "missing port"),
        ("*", "missing port"),
        ("[::1]", "missing port"),
        ("[::1:443", "missing port"),
        ("pypi.org:", "port must be"),
        ("pypi.org:0", "port must be"),
        ("pypi.org:65536", "port must be"),
        ("pypi.org:-1", "port must be"),
        ("pypi.org:+443", "port must be"),
        ("pypi.org: 443", "port must be"),
        ("pypi.org:٤٤٣", "port must be"),  # Arabic-Indic digits
        ("pypi.org:http", "port must be"),
        ("*:443", "'*' is allowed only as the whole first label"),
        ("*:*", "'*' is allowed only as the whole first label"),
        ("a.*.example.com:443", "'*' is allowed only as the whole first label"),
        ("*a.example.com:443", "'*' is allowed only as the whole first label"),
        ("*.*.example.com:443", "'*' is allowed only as the whole first label"),
        ("api.*:443", "'*' is allowed only as the whole first label"),
        ("*.com:443", "too broad"),
        ("*.localhost:*", "too broad"),
        ("*.10.0.0.1:443", "wildcard cannot be combined with an IP address"),
        ("*.[::1]:443", "wildcard cannot be combined with an IP address"),
        ("::1:443", "IPv6 address in brackets"),
        ("[1.2.3.4]:80", "not a valid IPv6 address"),
        ("127.1:80", "ambiguous IP address form"),
        ("a..b:443", "empty label"),
        (" pypi.org:443", "invalid character ' '"),
        (443, "expected a string like 'host:443', got int"),
        (None, "expected a string like 'host:443', got NoneType"),
    ],
)
def test_parse_errors_name_the_entry(entry: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Policy.parse(["pypi.org:443", entry])
    assert str(info.value).startswith("policy.allow[1]: ")
    assert message in str(info.value)


def test_parse_error_uses_the_given_path() -> None:
    with pytest.raises(ValueError, match=r"^cfg\.allow\[0\]: "):
        Policy.parse(["pypi.org"], "cfg.allow")


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.0", "private"),
        ("172.31.255.255", "private"),
        ("172.32.0.1", None),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.255", "cgnat"),
        ("100.128.0.1", None),
        ("224.0.0.1", "multicast"),
        ("239.255.255.255", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "reserved"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fc00::1", "private"),
        ("fd12::1", "private"),
        ("fe80::1", "link-local"),
        ("fec0::1", "reserved"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("::127.0.0.1", "loopback"),  # IPv4-compatible
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:c0a8:101::1", "private"),  # 6to4 of 192.168.1.1
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("192.0.2.1", None),  # documentation range: is_private says True, the table does not
        ("2606:4700::1111", None),
        ("2001:db8::1", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
        ("2002:808:808::", None),
    ],
)
def test_internal_reason(address: str, reason: str | None) -> None:
    assert internal_reason(ip_address(address)) == reason


def _ips(*addresses: str) -> list[IPAddress]:
    return [ip_address(a) for a in addresses]


@pytest.mark.parametrize(
    "addresses, port, expected",
    [
        (_ips("8.8.8.8", "1.1.1.1"), 443, (ip_address("8.8.8.8"), None)),
        (_ips("2606:4700::1111", "8.8.8.8"), 443, (ip_address("2606:4700::1111"), None)),
        (_ips("8.8.8.8", "10.0.0.1"), 443, (None, "private")),  # one bad answer poisons the set
        (_ips("10.0.0.1", "8.8.8.8"), 443, (None, "private")),
        (_ips("169.254.169.254"), 443, (None, "link-local")),
        (_ips("2606:4700::1111", "::ffff:127.0.0.1"), 443, (None, "loopback")),
        (_ips("10.0.0.5"), 8080, (ip_address("10.0.0.5"), None)),  # listed literally
        (_ips("8.8.8.8", "10.0.0.5"), 8080, (ip_address("8.8.8.8"), None)),
        (_ips("fd00::1"), 9, (ip_address("fd00::1"), None)),
        (_ips("10.0.0.5"), 9090, (None, "private")),  # listed, but for another port
        (_ips("10.0.0.5", "10.0.0.6"), 8080, (None, "private")),  # the second is not listed
        (_ips("::ffff:10.0.0.5"), 8080, (ip_address("::ffff:10.0.0.5"), None)),  # one address with 10.0.0.5
        (_ips("::ffff:10.0.0.6"), 8080, (None, "private")),
        ([], 443, (None, "no addresses")),
    ],
)
def test_check_resolved(addresses: list[IPAddress], port: int, expected: tuple[object, object]) -> None:
    policy = Policy.parse(["internal.example:*", "10.0.0.5:8080", "[fd00::1]:*"])
    assert check_resolved(policy, addresses, port) == expected


def test_names_ip_only_for_ip_literal_entries() -> None:
    policy = Policy.parse(["10.0.0.5:8080", "[fd00::1]:*", "internal.example:*", "*.internal.example:*"])
    assert policy.names_ip(IPv4Address("10.0.0.5"), 8080)
    assert not policy.names_ip(IPv4Address("10.0.0.5"), 80)
    assert not policy.names_ip(IPv4Address("10.0.0.6"), 8080)
    assert policy.names_ip(IPv6Address("fd00::1"), 1)
    assert policy.names_ip(IPv6Address("::ffff:10.0.0.5"), 8080)  # an IPv4 address and its ::ffff: form are one
    assert not policy.names_ip(IPv6Address("::ffff:10.0.0.5"), 80)


# --- this host's addresses, metadata services, more IPv4 embeddings -----------------------

OWN = frozenset(_ips("203.0.113.7", "2001:db8::7"))


@pytest.mark.parametrize("address, reason", [
    ("203.0.113.7", "this-host"),
    ("2001:db8::7", "this-host"),
    ("::ffff:203.0.113.7", "this-host"),  # mapped: judged by the IPv4 address
    ("203.0.113.8", None),
    ("168.63.129.16", "metadata"),  # Azure WireServer
    ("192.0.0.192", "metadata"),  # Oracle Cloud metadata
    ("::ffff:168.63.129.16", "metadata"),
    ("::ffff:0:127.0.0.1", "loopback"),  # IPv4-translated (::ffff:0:0:0/96)
    ("::ffff:0:a9fe:a9fe", "link-local"),  # 169.254.169.254, translated
    ("::ffff:0:808:808", None),
    # Teredo: the client's IPv4 address is the low 32 bits, inverted
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # client 127.0.0.1
    ("2001:0:4136:e378:8000:63bf:f5ff:fffd", "private"),  # client 10.0.0.2
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),  # client 8.8.8.8
])
def test_internal_reason_with_own_addresses(address: str, reason: str | None) -> None:
    assert internal_reason(ip_address(address), OWN) == reason


def test_own_address_is_internal_on_every_port_unless_listed_literally() -> None:
    policy = Policy.parse(["allowed.example:*", "203.0.113.7:8443"])
    for port in (22, 3128, 9090):
        assert check_resolved(policy, _ips("203.0.113.7"), port, own=OWN) == (None, "this-host")
    assert check_resolved(policy, _ips("203.0.113.7"), 8443, own=OWN) == (ip_address("203.0.113.7"), None)
    assert check_resolved(policy, _ips("203.0.113.7"), 22) == (ip_address("203.0.113.7"), None)  # not ours


def test_an_ipv4_mapped_entry_exempts_the_ipv4_address() -> None:
    policy = Policy.parse(["[::ffff:10.0.0.5]:8080"])
    assert policy.names_ip(IPv4Address("10.0.0.5"), 8080)
    assert check_resolved(policy, _ips("10.0.0.5"), 8080) == (ip_address("10.0.0.5"), None)
