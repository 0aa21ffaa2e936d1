"""The resource that serves inference.local: detect the protocol, refuse the rest."""
from __future__ import annotations

from urllib.parse import unquote

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from navtwist.inference import errors
from navtwist.inference.protocols import MODEL_DISCOVERY, detect
from navtwist.inference.router import InferenceRouter, client_model, parse_body


def model_object(name: str, anthropic: bool) -> dict:
    """One entry of a model list, in the shape the client's SDK expects."""
    if anthropic:
        return {"type": "model", "id": name, "display_name": name, "created_at": "1970-01-01T00:00:00Z"}
    return {"id": name, "object": "model", "created": 0, "owned_by": "navtwist"}


def _short(text: str | None) -> str | None:
    """A client's string, cut so it cannot blow up an error message."""
    return text if text is None or len(text) <= 200 else text[:200] + "…"


class InferenceDispatcher(Resource):
    """Hands each inference API request to the router; nothing else reaches an upstream."""

    isLeaf = True

    def __init__(self, router: InferenceRouter) -> None:
        super().__init__()
        self._router = router

    @property
    def router(self) -> InferenceRouter:
        return self._router

    def render(self, request: Request) -> int:
        # Twisted's own Server header names its version; ours names nothing.
        request.responseHeaders.setRawHeaders(b"server", [b"navtwist"])
        protocol = detect(request.method, request.path)
        if protocol is None:
            path = request.path.decode("latin-1")
            self._router.refuse(request, errors.NOT_INFERENCE, fields={"path": _short(path)})
        elif protocol == MODEL_DISCOVERY:
            self._models(request)
        elif not self._router.serves(protocol):
            self._router.refuse(request, errors.NO_ROUTE, fields={"protocol": protocol})
        else:
            self._route(request, protocol)
        return NOT_DONE_YET

    def _route(self, request: Request, protocol: str) -> None:
        assert request.content is not None  # twisted.web sets it before rendering
        request.content.seek(0)
        body = request.content.read() or None
        try:
            document = parse_body(body)
        except ValueError:
            self._router.refuse(request, errors.INVALID_JSON, fields={"protocol": protocol})
            return
        if body is not None and not isinstance(document, dict):
            # An array or a scalar: no API takes one, and the route's model cannot be set in it.
            self._router.refuse(request, errors.NOT_AN_OBJECT, fields={"protocol": protocol})
            return
        requested = client_model(document)
        routes = self._router.candidates(protocol, requested)
        if not routes:
            offered = ", ".join(self._router.model_names()) or "none"
            self._router.refuse(request, errors.MODEL_NOT_FOUND,
                                f"model {_short(requested)!r} is not served here (available: {offered})",
                                fields={"protocol": protocol, "client_model": _short(requested)})
            return
        self._router.forward(request, protocol, routes, body, document)

    def _models(self, request: Request) -> None:
        """Answer from the config: the names clients may ask for, not an upstream's list."""
        anthropic = request.requestHeaders.hasHeader(b"anthropic-version")
        names = self._router.model_names()
        prefix = b"/v1/models/"
        if request.path.startswith(prefix):
            name = unquote(request.path[len(prefix):].decode("utf-8", "replace"))
            if name not in names:
                self._router.refuse(request, errors.MODEL_NOT_FOUND, f"model {_short(name)!r} is not served here",
                                    fields={"protocol": MODEL_DISCOVERY, "client_model": _short(name)})
                return
            errors.write_json(request, 200, model_object(name, anthropic))
            return
        data = [model_object(name, anthropic) for name in names]
        if anthropic:
            errors.write_json(request, 200, {"data": data, "has_more": False,
                                 "first_id": names[0] if names else None, "last_id": names[-1] if names else None})
        else:
            errors.write_json(request, 200, {"object": "list", "data": data})
