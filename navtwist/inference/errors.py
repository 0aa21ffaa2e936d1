"""JSON error responses in the shape each client SDK parses.

OpenAI SDKs read C{{"error": {"message", "type", "code"}}}; Anthropic SDKs read
C{{"type": "error", "error": {"type", "message"}}}.  Messages are fixed texts:
they never carry an upstream endpoint, key or internal address.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from twisted.web.server import Request

from navtwist.inference.protocols import is_anthropic


@dataclass(frozen=True)
class ErrorKind:
    """One kind of refusal or failure and how each SDK family names it."""

    status: int
    code: str
    openai_type: str
    anthropic_type: str
    message: str


NOT_INFERENCE = ErrorKind(
    403, "policy_denied", "permission_error", "permission_error",
    "inference.local serves only inference API paths",
)
NO_ROUTE = ErrorKind(
    400, "no_compatible_route", "invalid_request_error", "invalid_request_error",
    "no compatible inference route available",
)
INVALID_JSON = ErrorKind(
    400, "invalid_json", "invalid_request_error", "invalid_request_error",
    "request body is not valid JSON",
)
BODY_TOO_LARGE = ErrorKind(
    413, "request_too_large", "invalid_request_error", "request_too_large",
    "request body exceeds the proxy's limit",
)
MODEL_NOT_FOUND = ErrorKind(
    404, "model_not_found", "not_found_error", "not_found_error",
    "model not found",
)
ROUTE_BUSY = ErrorKind(
    429, "route_busy", "rate_limit_error", "rate_limit_error",
    "too many concurrent requests for this model; retry shortly",
)
UPSTREAM_UNAVAILABLE = ErrorKind(
    503, "upstream_unavailable", "api_error", "overloaded_error",
    "inference service unavailable",
)
UPSTREAM_TIMEOUT = ErrorKind(
    504, "upstream_timeout", "api_error", "api_error",
    "inference service did not answer in time",
)
UPSTREAM_PROTOCOL = ErrorKind(
    502, "upstream_error", "api_error", "api_error",
    "inference service sent an invalid response",
)


def refused_by_hook(status: int) -> ErrorKind:
    """The error kind for a request hook's refusal with C{status}."""
    client_error = 400 <= status < 500
    kind = "invalid_request_error" if client_error else "api_error"
    return ErrorKind(status, "request_refused", kind, kind, "request refused by the proxy")


def error_document(protocol: str | None, kind: ErrorKind, message: str | None = None) -> dict:
    """The error object for C{protocol}'s SDK family (OpenAI's when unknown)."""
    text = message or kind.message
    if protocol is not None and is_anthropic(protocol):
        return {"type": "error", "error": {"type": kind.anthropic_type, "message": text}}
    return {"error": {"message": text, "type": kind.openai_type, "code": kind.code}}


def write_json(request: Request, status: int, document: dict) -> None:
    """Answer C{request} with a complete JSON response."""
    body = json.dumps(document).encode("utf-8")
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


def write_error(request: Request, protocol: str | None, kind: ErrorKind, message: str | None = None) -> None:
    """Answer C{request} with a JSON error in its SDK's shape."""
    write_json(request, kind.status, error_document(protocol, kind, message))


def stream_error_event(protocol: str, message: str) -> bytes:
    """One SSE event that tells a streaming client its response was cut short.

    The message goes through json.dumps, so a hostile upstream's text cannot
    inject extra events.
    """
    if is_anthropic(protocol):
        doc = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(doc).encode("utf-8") + b"\n\n"
    doc = {"error": {"message": message, "type": "proxy_stream_error", "code": "stream_truncated"}}
    return b"data: " + json.dumps(doc).encode("utf-8") + b"\n\n"
