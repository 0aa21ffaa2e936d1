"""Requests rendered at their head with the body piped to a consumer (deterministic)."""
from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from navtwist.config import Limits, Timeouts
from navtwist.http.channel import HardenedSite
from navtwist.http.streaming import BodyAborted, StreamingRequest


class Consumer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class Recorder(Resource):
    """Renders each request at once; C{answer} decides what it does."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.answer = "hold"

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        if self.answer == "deny":
            request.setResponseCode(403)
            request.setHeader(b"content-length", b"6")
            request.write(b"denied")
            request.finish()
        return NOT_DONE_YET


def _channel(limits: Limits = Limits()) -> tuple[Recorder, Any, StringTransport]:
    resource = Recorder()
    site = HardenedSite(resource, limits, Timeouts(), MemoryReactorClock(), requestFactory=StreamingRequest)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return resource, channel, transport


def _answer(request: Request, body: bytes = b"ok") -> None:
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def test_rendered_at_the_head_and_the_body_flows_as_it_arrives() -> None:
    resource, channel, transport = _channel()
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n")
    [request] = resource.requests
    assert request.method == b"POST" and request.uri == b"/up"
    consumer = Consumer()
    done = request.body.startProducing(consumer)
    channel.dataReceived(b"hello")
    assert consumer.data == b"hello" and not done.called
    channel.dataReceived(b"world")
    assert consumer.data == b"helloworld" and done.called
    assert request.body.received == 10


def test_a_full_consumer_stops_reading_the_client() -> None:
    resource, channel, transport = _channel()
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    [request] = resource.requests
    consumer = Consumer()
    request.body.startProducing(consumer)
    request.body.pauseProducing()
    assert transport.producerState == "paused"
    channel.dataReceived(b"5\r\nhello\r\n")
    assert consumer.data == b"" and transport.producerState == "paused"
    request.body.resumeProducing()
    assert consumer.data == b"hello" and transport.producerState == "producing"


def test_bytes_before_the_upstream_is_ready_wait_with_the_client_paused() -> None:
    resource, channel, transport = _channel()
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
    [request] = resource.requests
    assert transport.producerState == "paused"
    consumer = Consumer()
    done = request.body.startProducing(consumer)
    assert consumer.data == b"abc" and done.called


def test_an_answer_before_the_body_ends_waits_for_it_so_the_next_request_parses() -> None:
    resource, channel, transport = _channel()
    resource.answer = "deny"
    channel.dataReceived(b"POST /gists HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nsec")
    assert b"403" in transport.value() and len(resource.requests) == 1
    channel.dataReceived(b"ret")  # the rest of the denied body: discarded, not parsed as a head
    resource.answer = "hold"
    channel.dataReceived(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [r.uri for r in resource.requests] == [b"/gists", b"/next"]
    _answer(resource.requests[1])
    assert not transport.disconnecting


def test_discarding_more_than_the_body_limit_closes_the_connection() -> None:
    resource, channel, transport = _channel(Limits(max_body_bytes=4))
    resource.answer = "deny"
    channel.dataReceived(b"POST /gists HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    assert transport.disconnecting


def test_denied_with_expect_continue_sends_no_100_and_closes() -> None:
    resource, channel, transport = _channel()
    resource.answer = "deny"
    channel.dataReceived(b"POST /gists HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert b"100 Continue" not in transport.value() and b"403" in transport.value()
    assert transport.disconnecting


def test_allowed_with_expect_continue_is_told_to_go_on() -> None:
    resource, channel, transport = _channel()
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_a_client_leaving_mid_body_fails_the_upload() -> None:
    resource, channel, transport = _channel()
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhel")
    [request] = resource.requests
    failures: list[Failure] = []
    request.body.startProducing(Consumer()).addErrback(failures.append)
    channel.connectionLost(Failure(ConnectionError("gone")))
    assert failures and failures[0].check(BodyAborted)
