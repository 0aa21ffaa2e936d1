"""A smart-HTTP git origin over TLS on 127.0.0.1, for the integration tests.

Each request runs the real C{git http-backend} as a CGI program, as a web
server would: the request body (de-chunked if the client sent it chunked; a
gzip body is passed on as it is, with C{HTTP_CONTENT_ENCODING}, since
http-backend decodes it itself) goes to its stdin, its CGI headers become
the response head.  Every request is recorded, so a test can tell what got
past the proxy.
"""
from __future__ import annotations

import os
import ssl
import subprocess
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

from egress_servers import LoopbackHttpServer, QuietHandler, ServerThread
from upstream import read_request_body

TIMEOUT = 10.0


def _git_exec_path() -> Path:
    return Path(subprocess.run(["git", "--exec-path"], capture_output=True, text=True, check=True).stdout.strip())


HTTP_BACKEND = _git_exec_path() / "git-http-backend"


@dataclass(frozen=True)
class GitRequest:
    """One request the origin answered: C{path} without the query."""

    method: str
    path: str
    query: str
    status: int
    chunked: bool  # the body came with Transfer-Encoding: chunked
    encoding: str | None  # its Content-Encoding


def git(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run C{git args}, isolated from the user's and the system's config unless C{env} says otherwise."""
    return subprocess.run(["git", *args], cwd=cwd, env=env or isolated_env(cwd or Path.cwd()), capture_output=True,
                          text=True, timeout=TIMEOUT * 3, check=check)


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: no proxy, credential or config from the outside world."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0", "GIT_AUTHOR_NAME": "agent", "GIT_AUTHOR_EMAIL": "agent@sandbox",
        "GIT_COMMITTER_NAME": "agent", "GIT_COMMITTER_EMAIL": "agent@sandbox", "LC_ALL": "C", **extra,
    }


def make_bare_repo(root: Path, name: str = "repo.git") -> Path:
    """A bare repository under C{root} with one commit on C{main}, pushes enabled."""
    bare = root / name
    git("init", "-q", "--bare", "-b", "main", str(bare), cwd=root)
    git("config", "http.receivepack", "true", cwd=bare)
    seed = root / "seed"
    git("init", "-q", "-b", "main", str(seed), cwd=root)
    (seed / "README").write_text("hello from the origin\n")
    git("add", "README", cwd=seed)
    git("commit", "-q", "-m", "first", cwd=seed)
    git("push", "-q", str(bare), "main", cwd=seed)
    return bare


def http_backend(handler: BaseHTTPRequestHandler, root: Path, body: bytes,
                 remote_user: str = "agent") -> tuple[int, list[tuple[str, str]], bytes]:
    """Answer C{handler}'s request (its de-chunked C{body} read already) with
    C{git http-backend} as a CGI program serving C{root}: status, headers, payload."""
    url = urlsplit(handler.path)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(root), "GIT_PROJECT_ROOT": str(root), "GIT_HTTP_EXPORT_ALL": "1",
        "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PROTOCOL": "HTTP/1.1", "REQUEST_METHOD": handler.command,
        "PATH_INFO": url.path, "QUERY_STRING": url.query, "REMOTE_ADDR": handler.client_address[0],
        "REMOTE_USER": remote_user, "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": handler.headers.get("content-type", ""),
    }
    for name in ("content-encoding", "git-protocol"):
        if (value := handler.headers.get(name)) is not None:
            env["HTTP_" + name.upper().replace("-", "_")] = value
    result = subprocess.run([str(HTTP_BACKEND)], input=body, env=env, capture_output=True, timeout=TIMEOUT * 3)
    head, sep, payload = result.stdout.partition(b"\r\n\r\n")
    if not sep:  # CGI programs may end header lines with a bare LF
        head, sep, payload = result.stdout.partition(b"\n\n")
    status, headers = 200, []
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.split()[0])
        elif name:
            headers.append((name, value.strip()))
    return status, headers, payload


class _Handler(QuietHandler):
    server: _Server

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        body = read_request_body(self)  # de-chunked
        status, headers, payload = http_backend(self, self.server.root, body)
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        record = GitRequest(self.command, url.path, url.query, status, chunked, self.headers.get("content-encoding"))
        self.server.requests.append(record)
        self.answer(status, headers, payload)

    do_POST = do_GET


class _Server(LoopbackHttpServer):
    root: Path
    requests: list[GitRequest]


class GitOrigin(ServerThread[_Server]):
    """C{https://127.0.0.1:port/NAME.git} for each bare repository under C{root}."""

    def __init__(self, root: Path, tls: ssl.SSLContext) -> None:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.root, server.tls, server.requests = root, tls, []
        super().__init__(server)

    @property
    def requests(self) -> list[GitRequest]:
        return list(self._server.requests)
