"""The resource that serves inference.local: detect the protocol, refuse the rest."""
from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from navtwist import errors
from navtwist.protocols import detect
from navtwist.router import InferenceRouter


class InferenceDispatcher(Resource):
    """Hands each inference API request to the router; nothing else reaches an upstream."""

    isLeaf = True

    def __init__(self, router: InferenceRouter) -> None:
        super().__init__()
        self._router = router

    def render(self, request: Request) -> int:
        # Twisted's own Server header names its version; ours names nothing.
        request.responseHeaders.setRawHeaders(b"server", [b"navtwist"])
        protocol = detect(request.method, request.path)
        if protocol is None:
            errors.write_error(request, None, errors.NOT_INFERENCE)
            return NOT_DONE_YET
        route = self._router.pick(protocol)
        if route is None:
            errors.write_error(request, protocol, errors.NO_ROUTE)
            return NOT_DONE_YET
        request.content.seek(0)
        body = request.content.read() or None
        try:
            self._router.forward(request, protocol, route, body)
        except ValueError:
            errors.write_error(request, protocol, errors.INVALID_JSON)
        return NOT_DONE_YET
