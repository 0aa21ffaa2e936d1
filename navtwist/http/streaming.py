"""Requests whose body streams to the upstream as it arrives.

twisted.web's L{Request} holds the whole body (in memory, then in a temporary
file) and is rendered only once the last byte is in.  On an intercepted host
a C{git push} may upload a gigabyte: L{StreamingRequest} is rendered as soon
as its head is complete, and its body is a push producer (L{BodyPipe}) the
upstream client consumes, so the client's socket is read only as fast as the
origin accepts bytes.

The channel keeps its framing duties: a response that ends before the body
does is held back (the body is read and discarded, up to C{max_body_bytes})
so the next pipelined request starts where the client thinks it does; past
that cap the connection closes after the response.
"""
from __future__ import annotations

import io
from collections import deque
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from navtwist.http.channel import CappedRequest


class BodyAborted(Exception):
    """The client left before its request body was complete."""


@implementer(IBodyProducer)
class BodyPipe:
    """A request body as an L{IBodyProducer}: each chunk goes to the consumer as it arrives.

    C{pause_source}/C{resume_source} stop and restart reading the client;
    they are called when the consumer (the upstream connection) is full.
    """

    def __init__(self, length: int | None, pause_source: Callable[[], None], resume_source: Callable[[], None]) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._pause_source = pause_source
        self._resume_source = resume_source
        self._consumer: IConsumer | None = None
        self._waiting: deque[bytes] = deque()
        self._paused = False
        self._complete = False
        self._failed: Failure | None = None
        self._done: Deferred[None] | None = None
        self.received = 0

    @property
    def complete(self) -> bool:
        return self._complete

    # -- the client side

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self._consumer is None or self._paused or self._waiting:
            self._waiting.append(data)
            self._pause_source()
            return
        self._consumer.write(data)

    def finish(self) -> None:
        self._complete = True
        self._settle()

    def abort(self, reason: Failure) -> None:
        self._failed = reason
        self._settle()

    # -- IBodyProducer, driven by the upstream client

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._done = done = Deferred[None]()
        # What arrived before the upstream connected paused the client: send it, read the client again.
        self.resumeProducing()
        return done

    def pauseProducing(self) -> None:
        self._paused = True
        self._pause_source()

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()
        if not self._paused and not self._complete:
            self._resume_source()
        self._settle()  # the body may have ended while its last bytes waited

    def stopProducing(self) -> None:
        # The upstream gave up on the body: nothing more goes to it.
        self._consumer = None
        self._waiting.clear()
        self._done = None

    def _flush(self) -> None:
        while self._waiting and self._consumer is not None and not self._paused:
            self._consumer.write(self._waiting.popleft())

    def _settle(self) -> None:
        done = self._done
        if done is None or self._waiting:
            return
        if self._failed is not None:
            self._done = None
            done.errback(self._failed)
        elif self._complete:
            self._done = None
            done.callback(None)


class StreamingRequest(CappedRequest):
    """A request rendered once its head is in, its body available as L{body}.

    The site's limits still apply: a body over C{max_body_bytes} is refused
    (413) by L{CappedRequest} only when the resource asked for a capped body;
    a streamed body is bounded by the origin, not by the proxy's memory.
    """

    body: BodyPipe | None = None
    _held_finish = False
    _discarded = 0

    def gotLength(self, length: int | None) -> None:
        # The limit applies to bodies the proxy itself would hold; a streamed
        # body is never held, so only the framing is kept from the base class.
        self.content = io.BytesIO()
        transport = self.channel.transport
        self.body = BodyPipe(length, transport.pauseProducing, transport.resumeProducing)
        command, path, version = self.channel.request_line()
        # Render now: the resource starts the upstream call and hands it the pipe.
        super(CappedRequest, self).requestReceived(command, path, version)

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel.refused or self.body is None:
            return
        if self.finished or self._held_finish:
            self._discard(data)
            return
        self.body.feed(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The body is complete; the request was rendered when its head arrived.
        if self.body is not None:
            self.body.finish()
        if self._held_finish:
            self._held_finish = False
            super().finish()

    def finish(self) -> None:
        """End the response; if the body is still arriving, end it once the body is in."""
        if self.body is not None and not self.body.complete and not self.channel.refused:
            if self.body.received == 0 and self.requestHeaders.hasHeader(b"expect"):
                # The client waits for 100 Continue before sending the body and
                # will never send it now: end the response and the connection.
                self.channel.persistent = False
                super().finish()
                return
            if not self._held_finish:
                self._held_finish = True
                self.body.stopProducing()
                self.channel.transport.resumeProducing()
            return
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        if self.body is not None and not self.body.complete:
            self.body.abort(Failure(BodyAborted("the client left before its request body was complete")))
        super().connectionLost(reason)

    def _discard(self, data: bytes) -> None:
        """Read a body nobody wants, so the next request's head is found; close past the cap."""
        self._discarded += len(data)
        if self._discarded > self.channel.site.limits.max_body_bytes:
            self.channel.persistent = False
            self._held_finish = False
            super().finish()

