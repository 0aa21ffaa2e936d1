"""Request bodies sent upstream, and the discarding of response bodies nobody reads."""
from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def upstream_body(body: IBodyProducer | None) -> IBodyProducer | None:
    """The body to hand the upstream client for a request rendered at its head
    (its pipe): None when it has none, so the Agent frames a bodiless request
    as one (a declared length of 0, or a request without a body)."""
    return body if body is not None and body.length != 0 else None


class Discard(Protocol):
    """Takes a response body nobody will read and closes its connection (a refused
    answer, a fallback status, a compressed body that cannot be decoded)."""

    # A body's transport is only an IPushProducer (IResponse.deliverBody), not the ITransport Protocol declares.
    transport: IPushProducer  # type: ignore[assignment]

    def connectionMade(self) -> None:
        self.transport.stopProducing()
