"""What navtwist says when it answers a request itself, and how exchanges end.

A leaf every stage may import: one refusal type (raised or returned wherever
navtwist refuses or cannot reach a destination) and one outcome vocabulary
shared by the relay, the exchange, metrics and logs.
"""
from __future__ import annotations

import enum


class Refusal(Exception):
    """A request navtwist answers itself: an HTTP status, a stable code and a
    message safe to show the client (it never names a secret or an upstream address).

    How the answer is worded (the proxy's C{{"error", "detail"}} or an SDK's
    error shape) is the business of the site that writes it.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.code!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Refusal):
            return NotImplemented
        return (self.status, self.code, self.message) == (other.status, other.code, other.message)

    def __hash__(self) -> int:
        return hash((self.status, self.code, self.message))


class Outcome(str, enum.Enum):
    """How an exchange ended.

    The request record's C{detail} names the precise case (or, when no
    candidate answered, the refusal's code); its C{outcome} is the case's
    L{category}, and the metrics count categories only.
    """

    OK = "ok"
    CLIENT_GONE = "client_gone"
    CLIENT_STALLED = "client_stalled"  # the client read nothing for too long: aborted
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_IDLE = "upstream_idle_timeout"  # the upstream sent nothing for too long
    UPSTREAM_DECODE_ERROR = "upstream_decode_error"  # a compressed body that is corrupt or cut short
    UPSTREAM_DECODE_LIMIT = "upstream_decode_limit"  # a compressed body past the decoding caps
    UPSTREAM_STATUS = "upstream_status"  # an upstream's 4xx/5xx answer, relayed whole
    TIMEOUT = "timeout"
    DRAIN_CUT = "drain_cut"  # still streaming at the drain deadline: the proxy ended it (its own category)
    REJECTED = "rejected"  # refused before any upstream answered (busy, policy, bad request)

    @property
    def category(self) -> Outcome:
        """The class this case is counted under."""
        return _CATEGORIES.get(self, self)


_CATEGORIES = {
    Outcome.CLIENT_STALLED: Outcome.CLIENT_GONE,
    Outcome.UPSTREAM_IDLE: Outcome.TIMEOUT,
    Outcome.UPSTREAM_DECODE_ERROR: Outcome.UPSTREAM_ERROR,
    Outcome.UPSTREAM_DECODE_LIMIT: Outcome.UPSTREAM_ERROR,
}

# The values a request record's C{outcome} takes: the metrics' label set.
CATEGORIES: frozenset[str] = frozenset(outcome.category.value for outcome in Outcome)

# Refusal codes written when no candidate answered, by the class they count under.
_REFUSAL_CATEGORIES = {
    "upstream_timeout": Outcome.TIMEOUT,
    "route_busy": Outcome.REJECTED,
    "policy_denied": Outcome.REJECTED,
    "ssrf_denied": Outcome.REJECTED,
    "bad_request": Outcome.REJECTED,
}


def outcome_class(detail: str, status: int | None = None) -> Outcome:
    """The category of a record's C{detail}: an outcome's value or a refusal code
    (an unknown code is a rejection when its C{status} is a client error, such
    as a request hook's refusal or a 413, else an upstream error)."""
    try:
        return Outcome(detail).category
    except ValueError:
        pass
    if detail in _REFUSAL_CATEGORIES:
        return _REFUSAL_CATEGORIES[detail]
    return Outcome.REJECTED if status is not None and 400 <= status < 500 else Outcome.UPSTREAM_ERROR
