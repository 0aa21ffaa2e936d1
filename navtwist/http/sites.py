"""The HTTP/1.1 server that runs inside an intercepted TLS connection.

The parsing, limits and refusals are L{navtwist.http.channel}'s; this site
only words its refusals the way the inference client reads errors: in
Anthropic's shape on Anthropic's paths, else OpenAI's.
"""
from __future__ import annotations

from navtwist.http.channel import HardenedSite
from navtwist.inference.errors import error_document
from navtwist.inference.protocols import detect
from navtwist.outcome import Refusal


class InterceptSite(HardenedSite):
    """The twisted.web site behind each intercepted inference.local connection."""

    def error_document(self, refusal: Refusal, target: tuple[bytes, bytes] | None) -> dict:
        return error_document(detect(*target) if target is not None else None, refusal)
