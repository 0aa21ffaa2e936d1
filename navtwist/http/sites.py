"""The HTTP/1.1 server that runs inside an intercepted TLS connection.

The parsing, limits and refusals are L{navtwist.http.channel}'s; this site
only logs and counts its refusals as the inference path's, and words them the way the inference client reads errors: in
Anthropic's shape on Anthropic's paths or with an C{anthropic-version}
header, else OpenAI's.
"""
from __future__ import annotations

from twisted.web.http_headers import Headers

from navtwist.http.channel import HardenedSite
from navtwist.inference.dispatch import InferenceDispatcher
from navtwist.inference.errors import error_document, refusal_shape
from navtwist.inference.protocols import detect
from navtwist.outcome import Refusal


class InterceptSite(HardenedSite):
    """The twisted.web site behind each intercepted inference.local connection."""

    def refused(self, refusal: Refusal, target: tuple[bytes, bytes] | None) -> None:
        """Logged and counted as the dispatcher's own refusals are (tests may serve another resource)."""
        if not isinstance(self.resource, InferenceDispatcher):
            super().refused(refusal, target)
            return
        self.resource.router.record_refusal(refusal, {"protocol": detect(*target) if target is not None else None})

    def error_document(self, refusal: Refusal, target: tuple[bytes, bytes] | None, headers: Headers | None) -> dict:
        return error_document(refusal_shape(target, headers), refusal)
