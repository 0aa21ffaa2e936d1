"""Why an upstream call failed, in one bounded vocabulary.

The one place that reads Twisted's failure types: the inference router and
the C{http://} forwarder word the client's answer from the L{Cause}, and the
metrics count it.
"""
from __future__ import annotations

import enum

from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from navtwist.outcome import Refusal


class RouteBusy(Exception):
    """Every candidate was at its concurrency limit."""


class UpstreamStatus(Exception):
    """A candidate answered with an error status (relayed, or fallen back on)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status


class StreamCut(Exception):
    """An answer whose body the upstream cut short: it died, fell silent or sent a corrupt encoding."""

    def __init__(self, outcome: str) -> None:
        super().__init__(f"upstream cut the response: {outcome}")
        self.outcome = outcome


class Cause(str, enum.Enum):
    """Why a call failed.  Every value but C{busy} and C{refused} is an upstream
    error kind (the label of C{navtwist_upstream_errors_total})."""

    BUSY = "busy"  # every candidate was at its limit: no upstream was called
    REFUSED = "refused"  # the proxy refused the destination (policy, SSRF guard, bad name)
    CONNECT = "connect"  # could not resolve or connect
    TIMEOUT = "timeout"  # a deadline passed: ours, connecting, or resolving
    TLS = "tls"
    PROTOCOL = "protocol"  # the upstream broke HTTP
    STATUS = "status"  # the upstream answered a 4xx/5xx status
    CUT = "stream_cut"  # the upstream cut a response under way
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
    if isinstance(failure.value, StreamCut):
        return Cause.CUT
    if isinstance(failure.value, (ResponseNeverReceived, ResponseFailed)):
        if _tls_error(failure) is not None:
            return Cause.TLS
        return Cause.PROTOCOL
    return Cause.OTHER


def _tls_error(failure: Failure) -> BaseException | None:
    """The TLS error (OpenSSL's, or service_identity's name check) inside a failed call, if that is why."""
    for reason in getattr(failure.value, "reasons", ()):
        if isinstance(reason, Failure) and type(reason.value).__module__.startswith(("OpenSSL", "service_identity")):
            return reason.value
    return None


def _tls_reason(error: BaseException) -> str:
    """OpenSSL's own reason texts (fixed library strings, such as C{certificate verify failed})."""
    texts = [entry[2] for entry in (error.args[0] if error.args and isinstance(error.args[0], list) else ())
             if isinstance(entry, tuple) and len(entry) == 3 and entry[2]]
    if texts:
        return "TLS handshake failed: " + ", ".join(texts)
    if type(error).__module__.startswith("service_identity"):
        return "TLS handshake failed: certificate does not match the host name"
    return "TLS handshake failed"


def describe(failure: Failure, timed_out: bool) -> str:
    """Why a call failed, in a few fixed words for logs and clients (never an
    address or a secret): which deadline passed, what TLS refused, how the
    connection failed."""
    tls = _tls_error(failure)
    if tls is not None:
        return _tls_reason(tls)
    if failure.check(ConnectingCancelledError, TimeoutError):
        return "timed out connecting"
    if timed_out:
        return "timed out waiting for response headers"
    if failure.check(DNSLookupError):
        return "name lookup failed"
    if failure.check(ConnectionRefusedError):
        return "connection refused"
    if failure.check(ConnectError):
        return "cannot connect"
    if isinstance(failure.value, ResponseNeverReceived) and any(
        isinstance(reason, Failure) and reason.check(ConnectionClosed) for reason in failure.value.reasons
    ):
        return "connection closed before response headers"
    if failure.check(ResponseNeverReceived, ResponseFailed):
        return "invalid response"
    return type(failure.value).__name__
