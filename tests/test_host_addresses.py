"""This host's addresses for the SSRF guard: parsed from the kernel's tables, cached briefly."""
from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock

from navtwist.egress.host_addresses import HostAddresses, read_host_addresses

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 203.0.113.0/24 2 0 2
           |-- 203.0.113.0
              /24 link UNICAST
           |-- 203.0.113.7
              /32 host LOCAL
           |-- 203.0.113.9
              /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 203.0.113.7
              /32 host LOCAL
"""
IF_INET6 = """20010db8000000000000000000000007 02 40 00 80     eth0
fe8000000000000000fc00fffe000001 02 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


def test_every_local_address_is_read(tmp_path: Path) -> None:
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "if_inet6").write_text(IF_INET6)
    found = read_host_addresses(tmp_path / "fib_trie", tmp_path / "if_inet6")
    assert found == {ip_address(a) for a in ("127.0.0.1", "203.0.113.7", "203.0.113.9", "2001:db8::7",
                                             "fe80::fc:ff:fe00:1", "::1")}


def test_a_missing_table_contributes_nothing(tmp_path: Path) -> None:
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    assert ip_address("203.0.113.7") in read_host_addresses(tmp_path / "fib_trie", tmp_path / "absent")


def test_addresses_are_reread_after_the_ttl() -> None:
    clock, reads = MemoryReactorClock(), []

    def read() -> frozenset:
        reads.append(clock.seconds())
        return frozenset({ip_address("203.0.113.7")})

    addresses = HostAddresses(clock, ttl=1.0, read=read)
    assert addresses() == {ip_address("203.0.113.7")}
    clock.advance(0.5)
    addresses()
    assert len(reads) == 1
    clock.advance(0.5)
    addresses()
    assert len(reads) == 2
