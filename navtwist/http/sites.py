"""The HTTP/1.1 server that runs inside an intercepted TLS connection.

The parsing, limits and refusals are L{navtwist.http.channel}'s; this site
only words its refusals the way the inference clients (OpenAI-style SDKs)
read errors.
"""
from __future__ import annotations

from navtwist.http.channel import HardenedSite, Refusal


class InterceptSite(HardenedSite):
    """The twisted.web site behind each intercepted inference.local connection."""

    def error_document(self, refusal: Refusal) -> dict:
        return {"error": {"message": refusal.message, "type": "invalid_request_error", "code": refusal.code}}
