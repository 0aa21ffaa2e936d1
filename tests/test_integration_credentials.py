"""Endpoint-bound credentials with real clients: curl, requests and git hold only the placeholder.

The placeholder comes from the real C{navtwist env}; the origin (HTTPS on
127.0.0.1 with its own CA, see L{token_origin}) accepts only the real
token, so every success here means navtwist swapped it in, and every
origin record says what left the proxy.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from conftest import TIMEOUT, Proxy, ProxyStarter
from egress_servers import HttpServer, ServerCert, make_server_cert
from git_origin import git, isolated_env, make_bare_repo
from token_origin import BASIC_USER, TokenOrigin, basic_password

pytestmark = pytest.mark.integration

NAVTWIST = Path(sys.executable).with_name("navtwist")
MOCK_ROUTES = [{"name": "inference.local", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}]
ALNUM = string.ascii_letters + string.digits


def github_token() -> str:
    """A fresh token of GitHub's classic format: C{ghp_} and 36 letters and digits."""
    return "ghp_" + "".join(secrets.choice(ALNUM) for _ in range(36))


SECRET = github_token()


@pytest.fixture
def origin_cert(tmp_path: Path) -> ServerCert:
    return make_server_cert(tmp_path)


@pytest.fixture
def repos(tmp_path: Path) -> Path:
    """A directory holding C{repo.git}: one commit on C{main} with a README."""
    root = tmp_path / "repos"
    root.mkdir()
    make_bare_repo(root)
    return root


@pytest.fixture
def origin(origin_cert: ServerCert, repos: Path) -> Iterator[TokenOrigin]:
    """The origin the credential is bound to; accepts only L{SECRET}."""
    server = TokenOrigin(origin_cert.server_context(), repos, {SECRET}).start()
    yield server
    server.stop()


@pytest.fixture
def other(origin_cert: ServerCert, repos: Path) -> Iterator[TokenOrigin]:
    """A second intercepted origin the credential is not bound to (it would accept the secret)."""
    server = TokenOrigin(origin_cert.server_context(), repos, {SECRET}).start()
    yield server
    server.stop()


@pytest.fixture
def plain() -> Iterator[HttpServer]:
    """A plain http:// origin, allowed by the policy."""
    server = HttpServer().start()
    yield server
    server.stop()


def _config(origin: TokenOrigin, cert: ServerCert, source: dict[str, str] | None = None,
            extra_entries: tuple[dict[str, Any], ...] = (), **top: Any) -> dict[str, Any]:
    """The credential C{github} (from C{source}; default: env GITHUB_TOKEN_REAL) bound to C{origin},
    an intercept entry for it and C{extra_entries}; C{top} adds top-level keys (C{policy} merged)."""
    entries = [_entry(origin, cert), *extra_entries]
    credential = {**(source or {"env": "GITHUB_TOKEN_REAL"}), "sandbox_env": "GITHUB_TOKEN",
                  "hosts": [f"127.0.0.1:{origin.port}"]}
    policy = {"intercept": entries, **top.pop("policy", {})}
    return {"routes": MOCK_ROUTES, "policy": policy, "credentials": {"github": credential}, **top}


def _entry(server: TokenOrigin, cert: ServerCert) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": server.port, "access": "full", "upstream_ca": str(cert.cert_path)}


SECRET_ENV = {"GITHUB_TOKEN_REAL": SECRET}


def navtwist_env(proxy: Proxy, env: dict[str, str] | None = None) -> dict[str, str]:
    """What the real C{navtwist env --format json} prints for the proxy's config."""
    result = subprocess.run(
        [str(NAVTWIST), "env", "--config", str(proxy.config_path), "--format", "json"],
        capture_output=True, text=True, timeout=TIMEOUT * 2, env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    variables: dict[str, str] = json.loads(result.stdout)
    return variables


def _curl(proxy: Proxy, url: str, *args: str) -> tuple[int, str]:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", str(TIMEOUT), "--noproxy", "", "-x", proxy.url, "--cacert", str(proxy.ca_path),
         "-w", "\n%{http_code}", *args, url],
        capture_output=True, text=True, timeout=TIMEOUT + 5, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    body, status = result.stdout.rsplit("\n", 1)
    return int(status), body


def _session(proxy: Proxy) -> requests.Session:
    session = requests.Session()
    session.proxies = {"https": proxy.url, "http": proxy.url}
    session.verify = str(proxy.ca_path)
    session.trust_env = False  # no REQUESTS_CA_BUNDLE, no NO_PROXY from the environment
    return session


def _everything_seen(server: TokenOrigin) -> str:
    """All the targets and header values the origin received, Basic payloads decoded."""
    parts = []
    for seen in server.seen:
        parts.append(seen.target)
        for _, value in seen.headers:
            parts.append(value)
            if value.lower().startswith("basic "):
                parts.append(base64.b64decode(value[6:]).decode("latin-1"))
    return "\n".join(parts)


def _placeholder(proxy: Proxy, env: dict[str, str] | None = None) -> str:
    """The sandbox's C{GITHUB_TOKEN}, checked to be shaped like L{SECRET} and not to be it."""
    placeholder = navtwist_env(proxy, env or SECRET_ENV)["GITHUB_TOKEN"]
    assert placeholder != SECRET
    assert placeholder.startswith("ghp_") and len(placeholder) == len(SECRET) == 40
    assert all(c in ALNUM for c in placeholder[4:]), placeholder
    return placeholder


# --- the placeholder works where it is bound ------------------------------------------------


def test_navtwist_env_prints_a_github_shaped_placeholder_that_survives_a_restart(
    start_proxy: ProxyStarter, origin: TokenOrigin, origin_cert: ServerCert
) -> None:
    proxy = start_proxy(_config(origin, origin_cert), env=SECRET_ENV)
    first = _placeholder(proxy)
    assert SECRET not in json.dumps(navtwist_env(proxy, SECRET_ENV))
    os.kill(proxy.pid, signal.SIGTERM)
    proxy.process.wait(TIMEOUT)
    assert navtwist_env(proxy, SECRET_ENV)["GITHUB_TOKEN"] == first  # same ca_dir, same seed


def test_curl_bearer_placeholder_reaches_the_origin_as_the_real_token(
    start_proxy: ProxyStarter, origin: TokenOrigin, origin_cert: ServerCert
) -> None:
    proxy = start_proxy(_config(origin, origin_cert), env=SECRET_ENV)
    placeholder = _placeholder(proxy)
    url = f"https://127.0.0.1:{origin.port}/bearer/user"
    status, body = _curl(proxy, url, "-H", f"Authorization: Bearer {placeholder}")
    assert status == 200, body
    [seen] = origin.seen
    assert seen.header("authorization") == [f"Bearer {SECRET}"]
    assert placeholder not in _everything_seen(origin)


def test_requests_basic_auth_placeholder_reaches_the_origin_as_the_real_token(
    start_proxy: ProxyStarter, origin: TokenOrigin, origin_cert: ServerCert
) -> None:
    proxy = start_proxy(_config(origin, origin_cert), env=SECRET_ENV)
    placeholder = _placeholder(proxy)
    with _session(proxy) as session:
        url = f"https://127.0.0.1:{origin.port}"
        response = session.get(f"{url}/basic/user", auth=(BASIC_USER, placeholder), timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        # A query value and a path segment are swapped too.
        response = session.get(f"{url}/basic/{placeholder}/x", params={"access_token": placeholder},
                               auth=(BASIC_USER, placeholder), timeout=TIMEOUT)
        assert response.status_code == 200, response.text
    first, second = origin.seen
    assert [basic_password(seen.header("authorization")[0]) for seen in (first, second)] == [SECRET, SECRET]
    assert second.target == f"/basic/{SECRET}/x?access_token={SECRET}"
    assert placeholder not in _everything_seen(origin)


def test_git_clones_over_smart_http_with_the_placeholder_as_password(
    start_proxy: ProxyStarter, origin: TokenOrigin, origin_cert: ServerCert, tmp_path: Path
) -> None:
    proxy = start_proxy(_config(origin, origin_cert), env=SECRET_ENV)
    placeholder = _placeholder(proxy)
    home = tmp_path / "sandbox"
    home.mkdir()
    env = isolated_env(home, https_proxy=proxy.url, GIT_SSL_CAINFO=str(proxy.ca_path))
    url = f"https://{BASIC_USER}:{placeholder}@127.0.0.1:{origin.port}/repo.git"
    cloned = git("clone", "-q", url, "work", cwd=home, env=env, check=False)
    assert cloned.returncode == 0, (cloned.stderr, proxy.log_text()[-2000:])
    assert (home / "work" / "README").read_text() == "hello from the origin\n"
    seen = origin.seen
    # git asks without credentials first; the 401's WWW-Authenticate makes it send its URL's.
    assert seen[0].status == 401 and not seen[0].header("authorization")
    authorized = seen[1:]
    assert [s.target for s in authorized][:1] == ["/repo.git/info/refs?service=git-upload-pack"]
    assert any(s.target == "/repo.git/git-upload-pack" and s.method == "POST" for s in authorized)
    assert all(s.status == 200 and basic_password(s.header("authorization")[0]) == SECRET for s in authorized)
    assert placeholder not in _everything_seen(origin)


# --- and nowhere else ----------------------------------------------------------------------


def test_placeholder_to_an_intercepted_origin_it_is_not_bound_to_is_refused(
    start_proxy: ProxyStarter, origin: TokenOrigin, other: TokenOrigin, origin_cert: ServerCert
) -> None:
    proxy = start_proxy(_config(origin, origin_cert, extra_entries=(_entry(other, origin_cert),)), env=SECRET_ENV)
    placeholder = _placeholder(proxy)
    url = f"https://127.0.0.1:{other.port}"
    expected = {"error": "credential_endpoint_mismatch",
                "detail": f"credential github is not bound to 127.0.0.1:{other.port}"}
    status, body = _curl(proxy, f"{url}/bearer/user", "-H", f"Authorization: Bearer {placeholder}")
    assert (status, json.loads(body)) == (403, expected)
    with _session(proxy) as session:
        for response in (
            session.get(f"{url}/basic/user", auth=(BASIC_USER, placeholder), timeout=TIMEOUT),
            session.get(f"{url}/bearer/user", params={"q": placeholder}, timeout=TIMEOUT),
            session.get(f"{url}/bearer/{placeholder}", timeout=TIMEOUT),
            # Inside the tunnel, a header navtwist never forwards still may not carry it.
            session.get(f"{url}/bearer/user", headers={"Proxy-Authorization": f"Basic {placeholder}"}, timeout=TIMEOUT),
            session.get(f"{url}/bearer/user", headers={"Connection": "x-hop", "X-Hop": placeholder}, timeout=TIMEOUT),
        ):
            assert (response.status_code, response.json()) == (403, expected)
            assert response.headers["x-navtwist-error"] == "credential_endpoint_mismatch"
        # The same connection pool, no placeholder: the second origin is reachable, so the 403s were navtwist's.
        assert session.get(f"{url}/basic/user", timeout=TIMEOUT).status_code == 401
    assert [seen.target for seen in other.seen] == ["/basic/user"]
    assert not other.seen[0].header("authorization")
    assert origin.seen == []


def test_plain_http_request_carrying_the_placeholder_is_refused(
    start_proxy: ProxyStarter, origin: TokenOrigin, origin_cert: ServerCert, plain: HttpServer
) -> None:
    proxy = start_proxy(_config(origin, origin_cert, policy={"allow": [f"127.0.0.1:{plain.port}"]}), env=SECRET_ENV)
    placeholder = _placeholder(proxy)
    url = f"http://127.0.0.1:{plain.port}"
    with _session(proxy) as session:
        refusals = [
            session.get(f"{url}/x", headers={"Authorization": f"Bearer {placeholder}"}, timeout=TIMEOUT),
            session.get(f"{url}/x", auth=(BASIC_USER, placeholder), timeout=TIMEOUT),
            session.get(f"{url}/x/{placeholder}", timeout=TIMEOUT),
        ]
        for response in refusals:
            assert response.status_code == 403, response.text
            assert response.json()["error"] == "credential_endpoint_mismatch"
        assert plain.seen == []
        # Without a placeholder the same request goes through: the refusal was the placeholder's.
        assert session.get(f"{url}/x", headers={"Authorization": "Bearer other"}, timeout=TIMEOUT).status_code == 200
    assert plain.paths() == ["/x"]
    status, body = _curl(proxy, f"{url}/y", "-H", f"Authorization: Bearer {placeholder}")
    assert status == 403 and json.loads(body)["error"] == "credential_endpoint_mismatch"
    assert plain.paths() == ["/x"]


# --- rotation ------------------------------------------------------------------------------


def _write_secret(path: Path, secret: str) -> None:
    """Atomically, as a secrets manager does."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(secret + "\n")
    os.replace(temporary, path)


class _Load:
    """A client sending sequential Bearer requests through the proxy until stopped
    (at most 200 requests or 10 s); records each status or error."""

    def __init__(self, proxy: Proxy, origin: TokenOrigin, placeholder: str) -> None:
        self.results: list[int | str] = []
        self._stop = threading.Event()
        self._proxy, self._origin, self._placeholder = proxy, origin, placeholder
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while len(self.results) < count and self._thread.is_alive():
            assert time.monotonic() < deadline, f"only {len(self.results)} requests done"
            time.sleep(0.01)
        assert len(self.results) >= count, f"the client stopped after {len(self.results)} requests: {self.results}"

    def _run(self) -> None:
        deadline = time.monotonic() + 10
        with _session(self._proxy) as session:
            for i in range(200):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    response = session.get(f"https://127.0.0.1:{self._origin.port}/bearer/{i}",
                                           headers={"Authorization": f"Bearer {self._placeholder}"}, timeout=TIMEOUT)
                    self.results.append(response.status_code)
                except requests.RequestException as e:
                    self.results.append(repr(e))


@pytest.mark.parametrize("trigger", ["sighup", "watch"])
def test_rotating_the_secret_file_under_load_fails_no_request_and_keeps_the_placeholder(
    start_proxy: ProxyStarter, origin: TokenOrigin, origin_cert: ServerCert, tmp_path: Path, trigger: str
) -> None:
    old, new = SECRET, github_token()
    secret_file = tmp_path / "github-token"
    _write_secret(secret_file, old)
    args = ("--watch", "--watch-interval", "0.1") if trigger == "watch" else ()
    proxy = start_proxy(_config(origin, origin_cert, {"file": str(secret_file)}), args=args)
    placeholder = _placeholder(proxy, {})
    origin.accept(old, new)  # the origin's own rotation window
    with _Load(proxy, origin, placeholder) as load:
        load.wait_for(20)
        _write_secret(secret_file, new)
        if trigger == "sighup":
            os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for_log("config reloaded")
        after = len(load.results)
        load.wait_for(after + 20)
    assert set(load.results) == {200}, load.results
    tokens = [seen.header("authorization")[0].removeprefix("Bearer ") for seen in origin.seen]
    assert len(tokens) == len(load.results)
    switch = tokens.index(new)
    assert switch >= 20 and tokens[:switch] == [old] * switch and tokens[switch:] == [new] * (len(tokens) - switch)
    assert switch <= after + 1  # every request sent after the reload was logged used the new secret
    origin.accept(new)  # the old token is revoked
    status, body = _curl(proxy, f"https://127.0.0.1:{origin.port}/bearer/last", "-H", f"Authorization: Bearer {placeholder}")
    assert status == 200, body
    assert navtwist_env(proxy)["GITHUB_TOKEN"] == placeholder  # reads the new secret: same shape, same placeholder
    log = proxy.log_text()
    assert old not in log and new not in log and placeholder not in log


# --- what the log says -----------------------------------------------------------------------


def test_logs_name_the_credential_and_never_hold_the_secret_or_the_placeholder(
    start_proxy: ProxyStarter, origin: TokenOrigin, other: TokenOrigin, origin_cert: ServerCert,
    plain: HttpServer, tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.jsonl"
    config = _config(origin, origin_cert, extra_entries=(_entry(other, origin_cert),), audit_log=str(audit),
                     policy={"allow": [f"127.0.0.1:{plain.port}"]})
    proxy = start_proxy(config, env=SECRET_ENV)
    placeholder = _placeholder(proxy)
    with _session(proxy) as session:
        base = f"https://127.0.0.1:{origin.port}"
        statuses = [
            session.get(f"{base}/bearer/{placeholder}", params={"t": placeholder},
                        headers={"Authorization": f"Bearer {placeholder}"}, timeout=TIMEOUT).status_code,
            session.get(f"{base}/basic/u", auth=(BASIC_USER, placeholder), timeout=TIMEOUT).status_code,
            session.get(f"https://127.0.0.1:{other.port}/bearer/{placeholder}", params={"t": placeholder},
                        headers={"Authorization": f"Bearer {placeholder}"}, timeout=TIMEOUT).status_code,
            session.get(f"http://127.0.0.1:{plain.port}/p/{placeholder}", params={"t": placeholder},
                        auth=(BASIC_USER, placeholder), timeout=TIMEOUT).status_code,
        ]
    assert statuses == [200, 200, 403, 403]
    assert [seen.target for seen in origin.seen] == [f"/bearer/{SECRET}?t={SECRET}", "/basic/u"]
    proxy.wait_for_log(f"127.0.0.1:{other.port} GET /bearer/")
    os.kill(proxy.pid, signal.SIGTERM)  # everything flushed
    proxy.process.wait(TIMEOUT)
    log = proxy.log_text()
    audit_text = audit.read_text()
    basic = base64.b64encode(f"{BASIC_USER}:{placeholder}".encode()).decode()
    real_basic = base64.b64encode(f"{BASIC_USER}:{SECRET}".encode()).decode()
    for text in (log, audit_text):
        for needle in (SECRET, placeholder, basic, real_basic, placeholder[4:], SECRET[4:]):
            assert needle not in text
    decisions = [line for line in log.splitlines() if "decision " in line]
    allowed = [line for line in decisions if f"decision allow request 127.0.0.1:{origin.port}" in line]
    refused = [line for line in decisions if f"127.0.0.1:{other.port} GET" in line]
    assert len(allowed) == 2 and all("credential=github" in line for line in allowed), decisions
    assert "[credential:github]" in allowed[0]
    clear = [line for line in decisions if f"127.0.0.1:{plain.port} GET" in line]
    for lines in (refused, clear):
        assert len(lines) == 1 and lines[0].endswith("(credential_endpoint_mismatch) credential=github"), decisions
    assert "GET /p/[credential:github]?t=REDACTED" in clear[0]
    events = [json.loads(line) for line in audit_text.splitlines()]
    named = [(e["dst_endpoint"]["port"], e["action"]) for e in events if e["unmapped"].get("credential") == "github"]
    assert named == [(origin.port, "Allowed"), (origin.port, "Allowed"), (other.port, "Denied"),
                     (plain.port, "Denied")]
