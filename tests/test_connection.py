"""Upstream response heads are capped as they arrive, on the pool's connections."""
from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport
from twisted.web._newclient import Request, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from navtwist.upstream.connection import HeadLimits, LimitedClientProtocol, ResponseHeadTooLarge, head_too_large

LIMITS = HeadLimits(max_bytes=4096, max_lines=20)


def connection() -> tuple[LimitedClientProtocol, StringTransport, list]:
    protocol = LimitedClientProtocol(lambda p: None, LIMITS, None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    outcome: list = []
    protocol.request(Request(b"GET", b"/", Headers({b"host": [b"upstream"]}), None)).addBoth(outcome.append)
    return protocol, transport, outcome


@pytest.mark.parametrize("line", [
    pytest.param(b"X-Filler: %d\r\n", id="header-lines"),
    pytest.param(b" continued %d\r\n", id="obs-fold-continuations"),
])
def test_endless_head_fails_as_soon_as_it_passes_the_limit(line: bytes) -> None:
    protocol, transport, outcome = connection()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nX-Start: a\r\n")
    sent = 0
    while not outcome and sent < 10 * LIMITS.max_bytes:
        data = line % sent
        protocol.dataReceived(data)
        sent += len(data)
    assert sent <= LIMITS.max_bytes
    [failure] = outcome
    assert failure.check(ResponseFailed, ResponseNeverReceived)
    assert isinstance(head_too_large(failure), ResponseHeadTooLarge)
    assert transport.disconnecting


def test_one_huge_read_of_many_small_lines_is_cut_too() -> None:
    protocol, transport, outcome = connection()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"A: b\r\n" * 5000 + b"\r\n")
    [failure] = outcome
    assert head_too_large(failure) is not None


def test_head_within_the_limits_passes_and_body_bytes_do_not_count() -> None:
    protocol, transport, outcome = connection()
    head = b"HTTP/1.1 200 OK\r\n" + b"A: b\r\n" * LIMITS.max_lines + b"Content-Length: 10000\r\n\r\n"
    # Content-Length is a header too: one over max_lines with the 20 "A" lines
    protocol.dataReceived(head.replace(b"A: b\r\n", b"", 1))
    [response] = outcome
    assert response.code == 200
    protocol.dataReceived(b"\n" * 9999)  # body lines are no head lines (one byte short of the end)
    assert not transport.disconnecting
