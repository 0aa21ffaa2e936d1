"""Secrets masked out of upstream error bodies on their way to the client.

A careless upstream echoes the key it was sent in its error message
("invalid api key sk-…").  The sandbox must never learn the route's key, so
the body of an error answer is passed through a L{Redactor}: every
occurrence of a secret is replaced by asterisks of the same length (a kept
Content-Length stays true).  Error bodies are small: the redactor holds one
whole, up to L{HOLD_BYTES}, and it goes out in one piece at its end.  Past
that it streams, holding back only the last C{len(secret) - 1} bytes, so an
occurrence split across chunks is still caught and memory stays bounded
whatever the body's size.  Secrets shorter than L{MIN_SECRET} (placeholders such as C{EMPTY})
are not masked: they would mangle ordinary words.
"""
from __future__ import annotations

from typing import Iterable

MIN_SECRET = 8
HOLD_BYTES = 65536


class Redactor:
    """Masks C{secrets} in a body fed chunk by chunk."""

    def __init__(self, secrets: Iterable[bytes]) -> None:
        self._secrets = tuple(sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True))
        self._hold = max((len(s) for s in self._secrets), default=1) - 1
        self._pending = b""

    def __bool__(self) -> bool:
        """Whether there is anything to mask."""
        return bool(self._secrets)

    def feed(self, data: bytes) -> bytes:
        """The part of the body so far that is safe to send: nothing while the
        body fits in L{HOLD_BYTES}, then all of it masked but a tail that may
        be the start of a secret continued in the next chunk."""
        self._pending += data
        if len(self._pending) <= HOLD_BYTES:
            return b""
        buffer = self._mask(self._pending)
        cut = max(len(buffer) - self._hold, 0)
        self._pending = buffer[cut:]
        return buffer[:cut]

    def flush(self) -> bytes:
        """What is held back, masked, at the body's end."""
        tail, self._pending = self._pending, b""
        return self._mask(tail)

    def _mask(self, data: bytes) -> bytes:
        for secret in self._secrets:
            data = data.replace(secret, b"*" * len(secret))
        return data
