"""The real C{git} client through an intercepted host: fetch allowed, push refused.

The origin is C{git http-backend} behind a local TLS server (L{git_origin}),
reached by IP literal and trusted through the entry's C{upstream_ca}; git
trusts only navtwist's CA and has no way to the origin but the proxy.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from conftest import Proxy, ProxyStarter
from egress_servers import ServerCert, make_server_cert
from git_origin import GitOrigin, git, isolated_env, make_bare_repo

pytestmark = pytest.mark.integration

MOCK_ROUTES = [{"name": "inference.local", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}]
DENY_REASON = "pushes go through review"


@pytest.fixture
def origin_cert(tmp_path: Path) -> ServerCert:
    (tmp_path / "cert").mkdir()
    return make_server_cert(tmp_path / "cert")


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    (tmp_path / "origin").mkdir()
    return make_bare_repo(tmp_path / "origin")


@pytest.fixture
def origin(bare: Path, origin_cert: ServerCert) -> Iterator[GitOrigin]:
    server = GitOrigin(bare.parent, origin_cert.server_context()).start()
    yield server
    server.stop()


def fetch_only(port: int, cert: ServerCert) -> dict[str, Any]:
    """Fetch (clone, pull) allowed; push refused, both its discovery GET and its POST."""
    return {
        "host": "127.0.0.1", "port": port, "upstream_ca": str(cert.cert_path),
        "access": "read-only", "deny_reason": DENY_REASON,
        "rules": [
            {"deny": {"method": "*", "path": "/**/git-receive-pack"}},
            {"deny": {"method": "*", "path": "/**/info/refs", "query": {"service": "git-receive-pack"}}},
            {"allow": {"method": "POST", "path": "/*/git-upload-pack"}},
        ],
    }


def read_write(port: int, cert: ServerCert) -> dict[str, Any]:
    """Fetch and push allowed."""
    return {
        "host": "127.0.0.1", "port": port, "upstream_ca": str(cert.cert_path), "access": "read-only",
        "rules": [{"allow": {"method": "POST", "path": "/*/git-upload-pack"}},
                  {"allow": {"method": "POST", "path": "/*/git-receive-pack"}}],
    }


def _client_git(proxy: Proxy, home: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """git as an agent in a sandbox runs it: through the proxy, trusting navtwist's CA only."""
    env = isolated_env(home, HTTPS_PROXY=proxy.url, https_proxy=proxy.url, NO_PROXY="", no_proxy="",
                       GIT_SSL_CAINFO=str(proxy.ca_path))
    return git(*args, cwd=cwd, env=env, check=False)


def _head(bare: Path) -> str:
    return git("rev-parse", "refs/heads/main", cwd=bare).stdout.strip()


def _clone_and_commit(proxy: Proxy, origin: GitOrigin, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    clone = _client_git(proxy, home, "clone", f"https://127.0.0.1:{origin.port}/repo.git", "work", cwd=home)
    assert clone.returncode == 0, (clone.stderr, proxy.log_text()[-3000:])
    work = home / "work"
    assert (work / "README").read_text() == "hello from the origin\n"
    (work / "change").write_text("from the sandbox\n")
    git("add", "change", cwd=work, env=isolated_env(home))
    git("commit", "-q", "-m", "agent change", cwd=work, env=isolated_env(home))
    return work


def test_clone_is_allowed_and_push_is_refused_with_the_agent_readable_403(
    start_proxy: ProxyStarter, origin: GitOrigin, origin_cert: ServerCert, bare: Path, tmp_path: Path
) -> None:
    proxy = start_proxy({"routes": MOCK_ROUTES, "policy": {"intercept": [fetch_only(origin.port, origin_cert)]}})
    before = _head(bare)
    work = _clone_and_commit(proxy, origin, tmp_path)
    # Protocol v2: the discovery GET, then ls-refs and fetch, each a POST to git-upload-pack.
    first, *rest = [(r.method, r.path, r.query, r.status) for r in origin.requests]
    assert first == ("GET", "/repo.git/info/refs", "service=git-upload-pack", 200)
    assert rest and set(rest) == {("POST", "/repo.git/git-upload-pack", "", 200)}

    push = _client_git(proxy, tmp_path / "home", "push", "origin", "main", cwd=work)
    assert push.returncode != 0
    # What git shows an agent: the URL and the status (it prints a body only when it is text/plain).
    assert "The requested URL returned error: 403" in push.stderr, push.stderr
    assert _head(bare) == before
    assert [r.query for r in origin.requests if "receive-pack" in r.path + r.query] == []
    log = proxy.wait_for_log("decision deny request")
    assert "GET /repo.git/info/refs?service=REDACTED" in log


def test_push_post_without_discovery_is_refused_with_the_reason(
    start_proxy: ProxyStarter, origin: GitOrigin, origin_cert: ServerCert, bare: Path
) -> None:
    """A client that skips the info/refs GET still cannot push: the POST itself is denied, and
    the 403 carries the deny_reason for the agent."""


    proxy = start_proxy({"routes": MOCK_ROUTES, "policy": {"intercept": [fetch_only(origin.port, origin_cert)]}})
    response = requests.post(
        f"https://127.0.0.1:{origin.port}/repo.git/git-receive-pack", data=b"0000",
        headers={"content-type": "application/x-git-receive-pack-request"},
        proxies={"https": proxy.url}, verify=str(proxy.ca_path), timeout=10,
    )
    assert response.status_code == 403 and response.headers["x-navtwist-error"] == "l7_denied"
    assert response.json() == {"error": "l7_denied", "reason": DENY_REASON,
                               "detail": "POST 127.0.0.1/repo.git/git-receive-pack not permitted by policy"}
    assert origin.requests == []


def test_push_goes_through_when_the_entry_allows_it(
    start_proxy: ProxyStarter, origin: GitOrigin, origin_cert: ServerCert, bare: Path, tmp_path: Path
) -> None:
    """The same origin and client with push allowed: the origin is real and the refusal above is the proxy's."""
    proxy = start_proxy({"routes": MOCK_ROUTES, "policy": {"intercept": [read_write(origin.port, origin_cert)]}})
    work = _clone_and_commit(proxy, origin, tmp_path)
    push = _client_git(proxy, tmp_path / "home", "push", "origin", "main", cwd=work)
    assert push.returncode == 0, (push.stderr, proxy.log_text()[-3000:])
    assert _head(bare) == git("rev-parse", "HEAD", cwd=work, env=isolated_env(tmp_path / "home")).stdout.strip()
    assert ("POST", "/repo.git/git-receive-pack", "", 200) in [
        (r.method, r.path, r.query, r.status) for r in origin.requests]


def test_large_push_with_a_chunked_body_goes_through(
    start_proxy: ProxyStarter, origin: GitOrigin, origin_cert: ServerCert, bare: Path, tmp_path: Path
) -> None:
    """A push bigger than git's http.postBuffer is sent chunked: it streams through the proxy intact."""
    proxy = start_proxy({"routes": MOCK_ROUTES, "policy": {"intercept": [read_write(origin.port, origin_cert)]}})
    work = _clone_and_commit(proxy, origin, tmp_path)
    (work / "big").write_bytes(os.urandom(3 * 1024 * 1024))  # incompressible
    git("add", "big", cwd=work, env=isolated_env(tmp_path / "home"))
    git("commit", "-q", "-m", "big", cwd=work, env=isolated_env(tmp_path / "home"))
    push = _client_git(proxy, tmp_path / "home", "-c", "http.postBuffer=65536", "push", "origin", "main", cwd=work)
    assert push.returncode == 0, (push.stderr, proxy.log_text()[-3000:])
    assert _head(bare) == git("rev-parse", "HEAD", cwd=work, env=isolated_env(tmp_path / "home")).stdout.strip()
    assert git("cat-file", "-s", "HEAD:big", cwd=bare).stdout.strip() == str(3 * 1024 * 1024)
    # git first probes with a small fixed-length POST, then sends the pack chunked.
    assert [r.chunked for r in origin.requests if r.path.endswith("/git-receive-pack")] == [False, True]
