"""ForwardResource (plain http:// forwarding), driven deterministically: a real
hardened channel on a RecordingTransport, a fake resolver and a fake agent."""
from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH

from navtwist.config import Limits, Timeouts
from navtwist.decisions import DecisionLog
from navtwist.egress.dial import Egress
from navtwist.egress.forward import ForwardResource
from navtwist.egress.policy import Policy
from navtwist.http.channel import HardenedSite
from navtwist.http.streaming import StreamingRequest
from navtwist.intercept.credentials import Binding, Credential, CredentialSet
from navtwist.testing import FakeAgent, FakeResolver, FakeResponse, RecordingTransport
from navtwist.upstream.exchange import Deadlines

FIRST_BYTE = 10.0
MAX_BODY = 1024  # what the channel reads and discards of a refused request's body before it closes


class Client:
    """One client connection to the forwarding site."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.agent = FakeAgent()
        egress = Egress(self.clock, self.clock, FakeResolver({"allowed.example": ["93.184.216.34"]}),
                        Policy.parse(["allowed.example:80"]), connect_timeout=4)
        self.resource = ForwardResource(egress, self.agent, self.clock, Deadlines(first_byte=FIRST_BYTE, idle=30,
                                                                                   write_stall=15))
        self.channel = HardenedSite(self.resource, Limits(max_body_bytes=MAX_BODY), Timeouts(), self.clock,
                                    requestFactory=StreamingRequest).buildProtocol(None)
        self.transport = RecordingTransport()
        self.channel.makeConnection(self.transport)

    def send(self, target: str, headers: str = "Host: allowed.example\r\n") -> None:
        self.channel.dataReceived(f"GET {target} HTTP/1.1\r\n{headers}\r\n".encode())

    def refusal(self) -> tuple[int, dict]:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(body)


@pytest.fixture
def client() -> Client:
    return Client()


def test_request_goes_to_the_checked_address_without_hop_headers(client: Client) -> None:
    client.send("http://allowed.example/p?q=1", "Host: allowed.example\r\nConnection: x-private\r\n"
                "X-Private: 1\r\nProxy-Authorization: Basic c2VjcmV0\r\nX-Kept: 2\r\n")
    [call] = client.agent.calls
    assert call.method == b"GET" and call.uri == b"http://93.184.216.34:80/p?q=1"
    assert call.headers.getRawHeaders(b"host") == [b"allowed.example"]
    assert call.headers.getRawHeaders(b"x-kept") == [b"2"]
    for dropped in (b"connection", b"x-private", b"proxy-authorization"):
        assert not call.headers.hasHeader(dropped), dropped
    response = FakeResponse(headers={b"content-type": [b"text/plain"]}, length=2)
    call.deferred.callback(response)
    response.send(b"ok")
    response.end()
    head, _, body = client.transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 2" in head.lower() and body == b"ok"


def test_placeholder_over_plain_http_is_refused_and_logged_as_a_decision_without_it(client: Client) -> None:
    github = Credential("github", "env", "GITHUB_TOKEN_REAL", "GITHUB_TOKEN", (Binding("api.github.com", 443),),
                        secret="ghp_" + "A" * 36)
    credentials = CredentialSet.create([github], b"s" * 32)
    placeholder = credentials.env_variables()["GITHUB_TOKEN"]
    client.resource.credentials = credentials
    client.resource.decisions = DecisionLog()
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client.send(f"http://allowed.example/p/{placeholder}?t={placeholder}")
    finally:
        globalLogPublisher.removeObserver(events.append)
    status, document = client.refusal()
    assert (status, document["error"]) == (403, "credential_endpoint_mismatch") and client.agent.calls == []
    [decision] = [event for event in events if event.get("event") == "decision"]
    assert decision["decision"] == "deny" and decision["credential"] == "github"
    assert formatEvent(decision) == ("decision deny request allowed.example:80 GET /p/[credential:github]?t=REDACTED "
                                     "(credential_endpoint_mismatch) credential=github")


def test_body_is_sent_with_the_agents_length_only_and_underscore_names_are_dropped(client: Client) -> None:
    # The Agent writes Content-Length from the body it is given: the client's must not be passed on too.
    client.channel.dataReceived(b"POST http://allowed.example/p HTTP/1.1\r\nHost: allowed.example\r\n"
                                b"Content-Length: 6\r\nTransfer_Encoding: chunked\r\nX_Kept: no\r\n"
                                b"X-Kept: yes\r\n\r\na body")
    [call] = client.agent.calls
    assert call.body == b"a body" and call.producer is not None and call.producer.length == 6
    assert not call.headers.hasHeader(b"content-length")
    assert [name for name, _ in call.headers.getAllRawHeaders() if b"_" in name] == []
    assert call.headers.getRawHeaders(b"x-kept") == [b"yes"]


def test_body_streams_to_the_destination_as_it_arrives(client: Client) -> None:
    """The request is sent at its head and its body follows as the client sends it: never held whole."""
    client.channel.dataReceived(b"PUT http://allowed.example/up HTTP/1.1\r\nHost: allowed.example\r\n"
                                b"Content-Length: 10\r\n\r\nhello")
    [call] = client.agent.calls
    assert call.body == b"hello"
    client.channel.dataReceived(b"world")
    assert call.body == b"helloworld"
    response = FakeResponse(length=0)
    call.deferred.callback(response)
    response.end()
    assert client.transport.value().startswith(b"HTTP/1.1 200 ")


def test_decision_counts_the_bytes_each_way(client: Client) -> None:
    client.resource.decisions = DecisionLog()
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client.channel.dataReceived(b"PUT http://allowed.example/up HTTP/1.1\r\nHost: allowed.example\r\n"
                                    b"Content-Length: 10\r\n\r\nhelloworld")
        [call] = client.agent.calls
        response = FakeResponse(length=3)
        call.deferred.callback(response)
        response.send(b"abc")
        response.end()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [decision] = [event for event in events if event.get("event") == "decision"]
    assert (decision["decision"], decision["bytes_up"], decision["bytes_down"]) == ("allow", 10, 3)


def test_a_full_destination_stops_reading_the_client(client: Client) -> None:
    client.channel.dataReceived(b"POST http://allowed.example/up HTTP/1.1\r\nHost: allowed.example\r\n"
                                b"Content-Length: 10\r\n\r\n")
    [call] = client.agent.calls
    assert call.producer is not None
    call.producer.pauseProducing()  # the destination's socket is full
    assert client.transport.producerState == "paused"
    client.channel.dataReceived(b"hello")
    assert call.body == b""
    call.producer.resumeProducing()
    assert call.body == b"hello" and client.transport.producerState == "producing"


def test_chunked_body_is_sent_chunked_without_the_clients_framing(client: Client) -> None:
    # UNKNOWN_LENGTH makes the Agent send its own chunked framing; the client's Transfer-Encoding is hop-by-hop.
    client.channel.dataReceived(b"POST http://allowed.example/p HTTP/1.1\r\nHost: allowed.example\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    [call] = client.agent.calls
    assert call.body == b"abc" and call.producer is not None and call.producer.length is UNKNOWN_LENGTH
    assert not call.headers.hasHeader(b"transfer-encoding") and not call.headers.hasHeader(b"content-length")


@pytest.mark.parametrize("head", [b"GET", b"POST"])
def test_request_without_a_body_is_sent_without_one(client: Client, head: bytes) -> None:
    # The Agent then writes Content-Length: 0 where the method expects a body.
    client.channel.dataReceived(head + b" http://allowed.example/p HTTP/1.1\r\nHost: allowed.example\r\n"
                                b"Content-Length: 0\r\n\r\n")
    [call] = client.agent.calls
    assert call.producer is None and call.body is None


@pytest.mark.parametrize("target", [
    "http://elsewhere.example/",  # policy_denied, once the egress stage has judged it
    "https://allowed.example/",  # refused at the head
    "http://allowed.example:99999/",  # an invalid URI
])
def test_refused_request_body_is_discarded_and_the_next_request_served(client: Client, target: str) -> None:
    client.channel.dataReceived(f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nsec".encode())
    assert client.transport.value().split(b" ")[1] in (b"400", b"403") and client.agent.calls == []
    client.channel.dataReceived(b"ret")  # the rest of the refused body: discarded, not read as a head
    client.transport.clear()
    client.send("http://allowed.example/next")
    [call] = client.agent.calls
    assert call.uri.endswith(b"/next") and not client.transport.disconnecting


def test_refused_request_body_past_the_cap_closes_the_connection(client: Client) -> None:
    client.channel.dataReceived(b"POST http://elsewhere.example/ HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 100000\r\n\r\n" + b"x" * (MAX_BODY + 1))
    assert client.refusal()[0] == 403 and client.transport.disconnecting and client.agent.calls == []


def test_refused_with_expect_continue_is_not_told_to_go_on(client: Client) -> None:
    client.channel.dataReceived(b"POST https://allowed.example/ HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
                                b"Expect: 100-continue\r\n\r\n")
    assert b"100 Continue" not in client.transport.value() and client.refusal()[0] == 400
    assert client.transport.disconnecting


def test_client_leaving_mid_body_fails_the_upload_and_cancels_the_call(client: Client) -> None:
    client.channel.dataReceived(b"POST http://allowed.example/up HTTP/1.1\r\nHost: allowed.example\r\n"
                                b"Content-Length: 10\r\n\r\nhel")
    client.channel.connectionLost(Failure(ConnectionDone()))
    assert client.agent.calls[0].cancelled


def test_destination_outside_the_policy_is_refused_and_never_asked(client: Client) -> None:
    client.send("http://elsewhere.example/")
    assert client.refusal()[0] == 403 and client.agent.calls == []


@pytest.mark.parametrize("target, detail", [
    ("https://allowed.example/", "use CONNECT for https:// URLs"),
    ("http://user:pw@allowed.example/", "credentials in the URI are not forwarded"),
    ("ftp://allowed.example/", "expected an absolute http:// URI"),
])
def test_bad_targets_are_400(client: Client, target: str, detail: str) -> None:
    client.send(target)
    assert client.refusal() == (400, {"error": "bad_request", "detail": detail}) and client.agent.calls == []


def test_silent_destination_is_504_at_the_first_byte_deadline(client: Client) -> None:
    client.send("http://allowed.example/")
    client.clock.advance(FIRST_BYTE - 0.1)
    assert client.transport.value() == b""
    client.clock.advance(0.2)
    assert client.refusal()[1]["error"] == "upstream_timeout" and client.agent.calls[0].cancelled


def test_unreachable_destination_is_502_without_its_address(client: Client) -> None:
    client.send("http://allowed.example/")
    client.agent.calls[0].deferred.errback(Failure(ConnectionRefusedError("93.184.216.34")))
    status, document = client.refusal()
    assert (status, document["error"]) == (502, "upstream_unreachable")
    assert b"93.184.216.34" not in client.transport.value()


def test_client_leaving_cancels_the_call(client: Client) -> None:
    client.send("http://allowed.example/")
    client.channel.connectionLost(Failure(ConnectionDone()))
    assert client.agent.calls[0].cancelled
