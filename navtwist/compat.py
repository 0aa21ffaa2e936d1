"""The one place navtwist touches Twisted's private names, checked at import.

A silent fallback to Twisted's defaults in the HTTP channel would reopen the
request-smuggling holes the hardened channel closes, so a Twisted release
that lacks one of these names stops navtwist at start with a message naming
it, instead of running without the check.
"""
from __future__ import annotations

from twisted.web.http import HTTPChannel


class UnsupportedTwisted(ImportError):
    """This Twisted lacks a private name navtwist relies on."""


def _channel_has_request_line() -> None:
    # HTTPChannel stores the request line in these attributes while the head is read
    # (twisted/web/http.py, HTTPChannel.lineReceived and allContentReceived).
    import inspect

    source = inspect.getsource(HTTPChannel.lineReceived)
    for name in ("_command", "_path", "_version"):
        if f"self.{name}" not in source:
            raise UnsupportedTwisted(f"navtwist needs HTTPChannel.{name}, which this Twisted does not set")


_channel_has_request_line()


def request_line(channel: HTTPChannel) -> tuple[bytes, bytes, bytes]:
    """The method, request-target and version of the request whose head C{channel} just read."""
    return channel._command, channel._path, channel._version  # type: ignore[attr-defined]
