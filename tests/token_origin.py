"""An HTTPS origin on 127.0.0.1 that demands a real token, for the credential tests.

C{/bearer/...} wants C{Authorization: Bearer TOKEN}; C{/basic/...} and the
git repositories (C{/NAME.git/...}, served by the real C{git http-backend},
see L{git_origin}) want C{Basic x-access-token:TOKEN}.  Without an accepted
token the answer is C{401} with C{WWW-Authenticate: Basic}, so C{git} sends
the credentials of its URL.  Every request is recorded (headers as they
arrived, before any check), so a test can say exactly what the origin saw,
and that a refused request never arrived.
"""
from __future__ import annotations

import base64
import json
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from egress_servers import LoopbackHttpServer, QuietHandler, ServerThread
from git_origin import http_backend
from upstream import read_request_body

BASIC_USER = "x-access-token"


@dataclass(frozen=True)
class Seen:
    """One request the origin received and how it answered."""

    method: str
    target: str  # path and query, as sent
    headers: tuple[tuple[str, str], ...]  # lower-cased names, in order
    status: int

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


def basic_password(value: str) -> str | None:
    """The password of a C{Basic} header value for L{BASIC_USER}, else None."""
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode("ascii").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return password if user == BASIC_USER else None


class _Handler(QuietHandler):
    server: _Server

    def do_GET(self) -> None:
        body = read_request_body(self)
        path = urlsplit(self.path).path
        authorization = self.headers.get("authorization", "")
        if path.startswith("/bearer/"):
            scheme, _, token = authorization.partition(" ")
            allowed = scheme.lower() == "bearer" and token in self.server.accepted
        else:
            allowed = basic_password(authorization) in self.server.accepted
        headers = tuple((name.lower(), value) for name, value in self.headers.items())
        if not allowed:
            self._record(headers, 401)
            self.answer(401, [("www-authenticate", 'Basic realm="origin"'), ("content-type", "application/json")],
                         json.dumps({"error": "bad credentials"}).encode())
        elif ".git/" in path:
            self._git(headers, body)
        else:
            self._record(headers, 200)
            self.answer(200, [("content-type", "application/json")],
                         json.dumps({"ok": True, "path": self.path}).encode())

    do_POST = do_GET

    def _git(self, headers: tuple[tuple[str, str], ...], body: bytes) -> None:
        status, cgi_headers, payload = http_backend(self, self.server.root, body, BASIC_USER)
        self._record(headers, status)
        self.answer(status, cgi_headers, payload)

    def _record(self, headers: tuple[tuple[str, str], ...], status: int) -> None:
        with self.server.lock:
            self.server.seen.append(Seen(self.command, self.path, headers, status))


class _Server(LoopbackHttpServer):
    root: Path
    accepted: frozenset[str]
    seen: list[Seen]
    lock: threading.Lock


class TokenOrigin(ServerThread[_Server]):
    """C{https://127.0.0.1:port}, accepting the tokens in L{accepted}; git repositories under C{root}."""

    def __init__(self, tls: ssl.SSLContext, root: Path, accepted: set[str]) -> None:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.tls, server.root = tls, root
        server.accepted, server.seen, server.lock = frozenset(accepted), [], threading.Lock()
        super().__init__(server)

    @property
    def seen(self) -> list[Seen]:
        with self._server.lock:
            return list(self._server.seen)

    def accept(self, *tokens: str) -> None:
        """From now on, accept exactly C{tokens}."""
        self._server.accepted = frozenset(tokens)
