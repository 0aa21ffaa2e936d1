"""Deterministic test doubles for navtwist and its plugins, as treq ships treq.testing.

L{make_harness} runs the real inference path (twisted.web channel, dispatcher,
router, relay, request hooks and stream observers) over an in-memory
transport: the upstream is a L{FakeAgent} the test answers by hand with
L{FakeResponse}s, and a C{MemoryReactorClock} drives every timeout.  Nothing
touches a socket.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IProtocol, IPushProducer, IResolutionReceiver
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from navtwist.config import Limits, Timeouts, parse_config
from navtwist.inference.dispatch import InferenceDispatcher
from navtwist.http.channel import HardenedChannel
from navtwist.http.sites import InterceptSite
from navtwist.inference.router import Extensions, InferenceRouter, make_client


class RecordingTransport(StringTransport):
    """A C{StringTransport} that tells an abort from a close.

    Twisted's own sets C{disconnecting} for both, so a test of "the peer is
    cut off" would pass with a polite C{loseConnection}, which may wait for
    ever on a peer that never reads.
    """

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    tls: object = None

    def startTLS(self, options: object, normal: bool = True) -> None:
        """Record the TLS options; the bytes stay plain."""
        self.tls = options


class _Collect:
    """Appends what a body producer writes to its call's C{body}, during the call and after it."""

    def __init__(self, call: UpstreamCall) -> None:
        self._call = call

    def write(self, data: bytes) -> None:
        self._call.body = (self._call.body or b"") + data

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


@dataclass
class UpstreamCall:
    """One request the fake agent received, and the Deferred the test fires."""

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes | None  # what its producer has written so far: a streamed body grows after the call
    deferred: Deferred = field(repr=False)
    cancelled: bool = False
    producer: IBodyProducer | None = field(default=None, repr=False)  # the body as the agent was given it


@implementer(IAgent)
class FakeAgent:
    """Records requests; each returns a Deferred the test answers by hand."""

    def __init__(self) -> None:
        self.calls: list[UpstreamCall] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        def cancel(d: Deferred) -> None:
            call.cancelled = True

        call = UpstreamCall(method, uri, headers or Headers(), None if bodyProducer is None else b"", Deferred(cancel),
                            producer=bodyProducer)
        self.calls.append(call)
        if bodyProducer is not None:
            bodyProducer.startProducing(_Collect(call))
        return call.deferred


@implementer(IPushProducer)
class FakeBodyTransport:
    """The transport a body protocol gets: records pause/resume/stop as Twisted's HTTP client does."""

    def __init__(self, response: "FakeResponse") -> None:
        self._response = response
        self.paused = False
        self.stopped = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True
        self._response.end(Failure(ResponseFailed([Failure(ConnectionDone())])))


@implementer(IResponse)
class FakeResponse:
    """An upstream response whose body the test feeds chunk by chunk."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, code: int = 200, headers: dict[bytes, list[bytes]] | None = None,
                 length: int | str = UNKNOWN_LENGTH) -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Error"
        self.headers = Headers(headers or {b"content-type": [b"text/event-stream"]})
        self.length = length
        self.protocol: IProtocol | None = None
        self.transport = FakeBodyTransport(self)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        # A body's transport is only an IPushProducer (IResponse.deliverBody), not an ITransport.
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]

    def send(self, data: bytes) -> None:
        assert self.protocol is not None, "send() before deliverBody()"
        self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(reason or Failure(ResponseDone()))


class FakeResolver:
    """Answers names from a table; a name mapped to None never answers."""

    def __init__(self, table: dict[str, list[str] | None]) -> None:
        self.table = table
        self.asked: list[tuple[str, int]] = []

    def resolveHostName(self, receiver: IResolutionReceiver, name: str, portNumber: int = 0,
                        addressTypes: Sequence[type[IAddress]] | None = None,
                        transportSemantics: str = "TCP") -> IResolutionReceiver:
        self.asked.append((name, portNumber))
        answers = self.table.get(name, [])
        if answers is None:
            return receiver
        receiver.resolutionBegan(object())  # type: ignore[arg-type]  # nobody reads the resolution
        for answer in answers:
            kind = IPv6Address if ":" in answer else IPv4Address
            receiver.addressResolved(kind("TCP", answer, portNumber))
        receiver.resolutionComplete()
        return receiver


@dataclass
class Harness:
    """One client connection to the inference.local site, and what is behind it."""

    clock: MemoryReactorClock
    agent: FakeAgent
    channel: HardenedChannel
    transport: RecordingTransport
    router: InferenceRouter

    def send(self, method: str, path: str, body: bytes = b"", **headers: str) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: inference.local", "Authorization: Bearer sk-client"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        if body:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        self.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def output(self) -> bytes:
        return self.transport.value()

    def response_json(self) -> tuple[int, dict]:
        head, _, body = self.output().partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(body)

    def disconnect(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))

    def another_connection(self) -> "Harness":
        """A second client connection to the same site, router and upstream."""
        channel = self.channel.site.buildProtocol(None)
        transport = RecordingTransport()
        channel.makeConnection(transport)
        return Harness(self.clock, self.agent, channel, transport, self.router)


def make_harness(config: dict, write_stall: float = 15.0, max_body_bytes: int = 1024,
                 extensions: Extensions | None = None) -> Harness:
    """A real twisted.web channel on a L{RecordingTransport}, serving the inference
    dispatcher with routes from C{config}; upstream calls go to a L{FakeAgent}."""
    clock = MemoryReactorClock()
    agent = FakeAgent()
    router = InferenceRouter(parse_config(config, {}).routes, clock, lambda route: make_client(agent), write_stall,
                             extensions)
    site = InterceptSite(InferenceDispatcher(router), Limits(max_body_bytes=max_body_bytes), Timeouts(), clock)
    channel = site.buildProtocol(None)
    transport = RecordingTransport()
    channel.makeConnection(transport)
    return Harness(clock, agent, channel, transport, router)
