"""Example request hook: cap how many tokens a sandbox may ask for per call.

Enable with C{plugins: [cap_max_tokens]}; the cap comes from the
C{NAVTWIST_MAX_TOKENS} environment variable (default 4096).  Requests asking
for more are lowered to the cap, not refused, so agents keep working.
"""
from __future__ import annotations

import os

from twisted.plugin import IPlugin
from zope.interface import implementer

from navtwist.interfaces import InferenceRequest, IRequestHook
from navtwist.outcome import Refusal

# Each API names the output limit differently.
_LIMIT_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@implementer(IPlugin, IRequestHook)
class CapMaxTokens:
    name = "cap_max_tokens"

    def __init__(self, default: int = 4096) -> None:
        self._default = default

    def cap(self) -> int:
        return int(os.environ.get("NAVTWIST_MAX_TOKENS", self._default))

    def before_upstream(self, request: InferenceRequest) -> Refusal | None:
        document = request.document
        if not isinstance(document, dict):
            return None
        cap = self.cap()
        for key in _LIMIT_KEYS:
            value = document.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                document[key] = cap
        return None


cap_max_tokens = CapMaxTokens()
