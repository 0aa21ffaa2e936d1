"""Why an upstream call failed, in one bounded vocabulary.

The one place that reads Twisted's failure types: the inference router and
the C{http://} forwarder word the client's answer from the L{Cause}, and the
metrics count it.
"""
from __future__ import annotations

import enum

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from navtwist.outcome import Refusal


class RouteBusy(Exception):
    """Every candidate was at its concurrency limit."""


class UpstreamStatus(Exception):
    """A candidate answered with a status its route falls back on."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status


class Cause(str, enum.Enum):
    """Why a call failed.  Every value but C{busy} and C{refused} is an upstream
    error kind (the label of C{navtwist_upstream_errors_total})."""

    BUSY = "busy"  # every candidate was at its limit: no upstream was called
    REFUSED = "refused"  # the proxy refused the destination (policy, SSRF guard, bad name)
    CONNECT = "connect"  # could not resolve or connect
    TIMEOUT = "timeout"  # a deadline passed: ours, connecting, or resolving
    TLS = "tls"
    PROTOCOL = "protocol"  # the upstream broke HTTP
    STATUS = "status"  # the upstream answered a status its route falls back on
    OTHER = "other"

    @property
    def is_upstream_error(self) -> bool:
        return self not in (Cause.BUSY, Cause.REFUSED)


UPSTREAM_ERROR_KINDS: tuple[str, ...] = tuple(cause.value for cause in Cause if cause.is_upstream_error)

# The egress stage's own refusals that mean the destination could not be reached.
_UNREACHABLE_CODES = {"upstream_unreachable": Cause.CONNECT, "upstream_timeout": Cause.TIMEOUT}


def classify(failure: Failure, timed_out: bool) -> Cause:
    """The cause of a failed upstream call; C{timed_out} says one of our deadlines cancelled it."""
    if failure.check(RouteBusy):
        return Cause.BUSY
    if isinstance(failure.value, Refusal):
        refusal = failure.value
        if refusal.status < 500:
            return Cause.REFUSED
        return _UNREACHABLE_CODES.get(refusal.code, Cause.OTHER)
    if timed_out or failure.check(TimeoutError, CancelledError):
        return Cause.TIMEOUT
    if failure.check(ConnectError, DNSLookupError):
        return Cause.CONNECT
    if failure.check(UpstreamStatus):
        return Cause.STATUS
    if isinstance(failure.value, (ResponseNeverReceived, ResponseFailed)):
        if any(type(reason.value).__module__.startswith("OpenSSL") for reason in failure.value.reasons):
            return Cause.TLS
        return Cause.PROTOCOL
    return Cause.OTHER
