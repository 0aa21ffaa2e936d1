"""The HTTP/1.1 server that runs inside an intercepted TLS connection.

The parsing, limits and refusals are L{navtwist.httpchannel}'s; this site
only words its refusals the way the inference clients (OpenAI-style SDKs)
read errors.
"""
from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource

from navtwist.config import Limits, Timeouts
from navtwist.httpchannel import HardenedSite, Refusal, raw_json_response

__all__ = ["InterceptSite", "raw_json_response"]  # raw_json_response: kept importable from here


class InterceptSite(HardenedSite):
    """The twisted.web site behind each intercepted inference.local connection."""

    def __init__(
        self,
        resource: IResource,
        limits: Limits,
        keepalive_idle: float,
        reactor: IReactorTime,
        head_read: float = Timeouts.head_read,
    ) -> None:
        super().__init__(resource, limits, Timeouts(head_read=head_read, keepalive_idle=keepalive_idle), reactor)

    def error_document(self, refusal: Refusal) -> dict:
        return {"error": {"message": refusal.message, "type": "invalid_request_error", "code": refusal.code}}
