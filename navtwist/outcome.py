"""What navtwist says when it answers a request itself, and how exchanges end.

A leaf every stage may import: one refusal type (raised or returned wherever
navtwist refuses or cannot reach a destination) and one outcome vocabulary
shared by the relay, the exchange, metrics and logs.
"""
from __future__ import annotations


class Refusal(Exception):
    """A request navtwist answers itself: an HTTP status, a stable code and a
    message safe to show the client (it never names a secret or an upstream address)."""

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
