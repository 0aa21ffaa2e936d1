"""Scriptable upstream fakes for deterministic tests of the router and relay."""
from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer


class _Collect:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

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
    body: bytes | None
    deferred: Deferred = field(repr=False)
    cancelled: bool = False


@implementer(IAgent)
class FakeAgent:
    """Records requests; each returns a Deferred the test answers by hand."""

    def __init__(self) -> None:
        self.calls: list[UpstreamCall] = []

    def request(self, method, uri, headers=None, bodyProducer: IBodyProducer | None = None):  # type: ignore[no-untyped-def]
        body = None
        if bodyProducer is not None:
            sink = _Collect()
            bodyProducer.startProducing(sink)
            body = sink.data

        def cancel(d: Deferred) -> None:
            call.cancelled = True

        call = UpstreamCall(method, uri, headers or Headers(), body, Deferred(cancel))
        self.calls.append(call)
        return call.deferred


@implementer(IPushProducer)
class FakeBodyTransport:
    """The transport a body protocol gets: records pause/resume/stop like _newclient's."""

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

    def __init__(self, code: int = 200, headers: dict[bytes, list[bytes]] | None = None, length=UNKNOWN_LENGTH):  # type: ignore[no-untyped-def]
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Error"
        self.headers = Headers(headers or {b"content-type": [b"text/event-stream"]})
        self.length = length
        self.protocol = None
        self.transport = FakeBodyTransport(self)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol) -> None:  # type: ignore[no-untyped-def]
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
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

    def resolveHostName(self, receiver, name, portNumber=0, addressTypes=None, transportSemantics="TCP"):  # type: ignore[no-untyped-def]
        self.asked.append((name, portNumber))
        answers = self.table.get(name, [])
        if answers is None:
            return
        receiver.resolutionBegan(object())
        for answer in answers:
            kind = IPv6Address if ":" in answer else IPv4Address
            receiver.addressResolved(kind("TCP", answer, portNumber))
        receiver.resolutionComplete()
