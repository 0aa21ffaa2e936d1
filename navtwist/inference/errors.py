"""JSON error responses in the shape each client SDK parses.

OpenAI SDKs read C{{"error": {"message", "type", "code"}}}; Anthropic SDKs read
C{{"type": "error", "error": {"type", "message"}}}.  Messages are fixed texts:
they never carry an upstream endpoint, key or internal address.
"""
from __future__ import annotations

import json

from twisted.web.server import Request

from twisted.web.http_headers import Headers

from navtwist.inference.protocols import ANTHROPIC_MESSAGES, OPENAI_RESPONSES, anthropic_client, detect, is_anthropic
from navtwist.outcome import Refusal
from navtwist.upstream.failures import Cause

# How each SDK family types a refusal, by code: (OpenAI's type, Anthropic's type).
# Codes not listed are typed by their status: a client error or the API's.
_SDK_TYPES: dict[str, tuple[str, str]] = {
    "policy_denied": ("permission_error", "permission_error"),
    "model_not_found": ("not_found_error", "not_found_error"),
    "route_busy": ("rate_limit_error", "rate_limit_error"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "upstream_unavailable": ("api_error", "overloaded_error"),
}

NOT_INFERENCE = Refusal(403, "policy_denied", "inference.local serves only inference API paths")
NO_ROUTE = Refusal(400, "no_compatible_route", "no compatible inference route available")
INVALID_JSON = Refusal(400, "invalid_json", "request body is not valid JSON")
NOT_AN_OBJECT = Refusal(400, "invalid_json", "request body must be a JSON object")
MODEL_NOT_FOUND = Refusal(404, "model_not_found", "model not found")
ROUTE_BUSY = Refusal(429, "route_busy", "too many concurrent requests for this model; retry shortly")
UPSTREAM_UNAVAILABLE = Refusal(503, "upstream_unavailable", "inference service unavailable")
UPSTREAM_TIMEOUT = Refusal(504, "upstream_timeout", "inference service did not answer in time")
UPSTREAM_PROTOCOL = Refusal(502, "upstream_error", "inference service sent an invalid response")


def upstream_refusal(cause: Cause) -> Refusal:
    """What an inference client is told when no candidate answered, for C{cause}."""
    if cause is Cause.BUSY:
        return ROUTE_BUSY
    if cause is Cause.TIMEOUT:
        return UPSTREAM_TIMEOUT
    if cause is Cause.CONNECT:
        return UPSTREAM_UNAVAILABLE
    return UPSTREAM_PROTOCOL


def sdk_types(refusal: Refusal) -> tuple[str, str]:
    """The (OpenAI, Anthropic) error types of C{refusal}."""
    known = _SDK_TYPES.get(refusal.code)
    if known is not None:
        return known
    kind = "invalid_request_error" if 400 <= refusal.status < 500 else "api_error"
    return kind, kind


def refusal_shape(target: tuple[bytes, bytes] | None, headers: Headers | None) -> str | None:
    """The protocol whose error shape a refusal of the request to C{target}
    (method, path) takes: Anthropic's for Anthropic clients whatever the path,
    else the path's, else None (OpenAI's)."""
    path = target[1] if target is not None else b""
    if anthropic_client(path, headers is not None and headers.hasHeader(b"anthropic-version")):
        return ANTHROPIC_MESSAGES
    return detect(*target) if target is not None else None


def error_document(protocol: str | None, refusal: Refusal, message: str | None = None) -> dict:
    """The error object for C{protocol}'s SDK family (OpenAI's when unknown)."""
    text = message or refusal.message
    openai_type, anthropic_type = sdk_types(refusal)
    if protocol is not None and is_anthropic(protocol):
        return {"type": "error", "error": {"type": anthropic_type, "message": text}}
    return {"error": {"message": text, "type": openai_type, "code": refusal.code}}


def write_json(request: Request, status: int, document: dict) -> None:
    """Answer C{request} with a complete JSON response."""
    body = json.dumps(document).encode("utf-8")
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


def write_error(request: Request, protocol: str | None, refusal: Refusal, message: str | None = None) -> None:
    """Answer C{request} with C{refusal} as a JSON error in its SDK's shape."""
    write_json(request, refusal.status, error_document(protocol, refusal, message))


def _event(name: str | None, document: dict) -> bytes:
    head = b"" if name is None else b"event: " + name.encode("ascii") + b"\n"
    return head + b"data: " + json.dumps(document).encode("utf-8") + b"\n\n"


def stream_error_event(protocol: str, message: str) -> bytes:
    """The SSE events that tell a streaming client its response was cut short.

    Responses API clients get OpenAI's C{error} event and then
    C{response.failed} (the Codex CLI reads only the latter, the SDKs surface
    both); neither carries a C{sequence_number}, as navtwist does not count the
    upstream's events.  The message goes through json.dumps, so a hostile
    upstream's text cannot inject extra events.
    """
    if is_anthropic(protocol):
        return _event("error", {"type": "error", "error": {"type": "api_error", "message": message}})
    if protocol == OPENAI_RESPONSES:
        error = {"code": "server_error", "message": message}
        return _event("error", {"type": "error", **error, "param": None}) + _event("response.failed", {
            "type": "response.failed",
            "response": {"object": "response", "status": "failed", "error": error, "incomplete_details": None},
        })
    return _event(None, {"error": {"message": message, "type": "proxy_stream_error", "code": "stream_truncated"}})
