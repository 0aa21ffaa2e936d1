"""L{BodyPipe}: a streamed request body's flow control between the client and the upstream."""
from __future__ import annotations

from twisted.internet.testing import StringTransport

from navtwist.http.streaming import BodyPipe


class Source:
    """The client's transport, as the pipe sees it: paused or reading."""

    def __init__(self) -> None:
        self.paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False


def test_body_that_arrives_before_the_upstream_connects_is_sent_and_the_client_read_again() -> None:
    """Bytes fed before C{startProducing} wait and pause the client; once the
    upstream consumes them, the client must be read again, else the body stalls."""
    source = Source()
    pipe = BodyPipe(None, source.pause, source.resume)
    pipe.feed(b"early")
    assert source.paused
    consumer = StringTransport()
    done = pipe.startProducing(consumer)
    assert consumer.value() == b"early"
    assert not source.paused
    pipe.feed(b" late")
    pipe.finish()
    assert consumer.value() == b"early late"
    assert done.called


def test_client_stays_paused_while_the_upstream_is_full() -> None:
    source = Source()
    pipe = BodyPipe(None, source.pause, source.resume)
    consumer = StringTransport()
    pipe.startProducing(consumer)
    pipe.pauseProducing()
    pipe.feed(b"x")
    assert source.paused and consumer.value() == b""
    pipe.resumeProducing()
    assert not source.paused and consumer.value() == b"x"


def test_body_that_ends_while_the_upstream_is_full_is_finished_once_it_drains() -> None:
    """The last bytes wait for the upstream after the client's body ended: the
    body must be declared complete when they go out, else the upstream waits forever."""
    source = Source()
    pipe = BodyPipe(None, source.pause, source.resume)
    consumer = StringTransport()
    done = pipe.startProducing(consumer)
    pipe.pauseProducing()
    pipe.feed(b"last")
    pipe.finish()
    assert not done.called
    pipe.resumeProducing()
    assert consumer.value() == b"last"
    assert done.called
