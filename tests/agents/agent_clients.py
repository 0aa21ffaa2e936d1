"""Real clients (Claude Code, the Codex CLI, the Node SDKs) through a real navtwist: `make test-agents`.

They run only where navtwist is their one way out: in a network namespace
that has nothing but loopback (`make test-agents` runs the session under
`unshare -n` as root), with the proxy and the upstream inside it too.
Anywhere else every test here is skipped, saying why (L{AGENTS}).

Fixtures live here rather than in a conftest.py: a second conftest module
would shadow tests/conftest.py for the helpers that import it by name.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from upstream import routes_config

HERE = Path(__file__).resolve().parent
CLIENT_TIMEOUT = 60.0  # the longest any one client run may take


def _isolation_problem() -> str | None:
    """Why this session is not confined to loopback, or None when it is."""
    if not os.environ.get("NAVTWIST_AGENTS_DIR"):
        return "real-client tests run with `make test-agents` (it installs the clients and isolates the network)"
    interfaces = [name for _, name in socket.if_nameindex()]
    if interfaces != ["lo"]:
        return (f"not in a loopback-only network namespace (interfaces: {', '.join(interfaces)}): "
                "`make test-agents` needs root for `unshare -n` so clients can only leave through navtwist")
    return None


ISOLATION_PROBLEM = _isolation_problem()

# Every test module here: pytestmark = AGENTS
AGENTS = [pytest.mark.agents, pytest.mark.integration,
          pytest.mark.skipif(ISOLATION_PROBLEM is not None, reason=ISOLATION_PROBLEM or "")]


@pytest.fixture(scope="session")
def modules() -> Path:
    """The node_modules directory `make test-agents` installed from tests/agents/package.json."""
    path = Path(os.environ["NAVTWIST_AGENTS_DIR"]) / "node_modules"
    if not path.is_dir():
        pytest.skip(f"{path} is missing: run `make test-agents`")
    return path


@pytest.fixture
def agent_proxy(start_proxy: Callable[..., Any], upstream: Any) -> Any:
    """navtwist with the standard OpenAI and Anthropic routes to the test's upstream."""
    return start_proxy(routes_config(upstream.url, first_byte_timeout=20, idle_timeout=20))


@pytest.fixture
def client_env(agent_proxy: Any, tmp_path: Path, modules: Path) -> dict[str, str]:
    """What a sandboxed client gets: navtwist as its proxy, navtwist's CA, a home of its own, no keys."""
    home = tmp_path / "home"
    home.mkdir()
    node = shutil.which("node")
    assert node is not None, "node is not installed"
    env = {
        "PATH": os.pathsep.join([str(modules / ".bin"), str(Path(node).parent), "/usr/bin", "/bin"]),
        "HOME": str(home),
        "TMPDIR": str(tmp_path),
        "NODE_PATH": str(modules),
        "NODE_EXTRA_CA_CERTS": str(agent_proxy.ca_path),
        "SSL_CERT_FILE": str(agent_proxy.ca_path),
        "NO_COLOR": "1",
        "TERM": "dumb",
    }
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        env[name] = agent_proxy.url
    env["NO_PROXY"] = env["no_proxy"] = ""
    return env


@dataclass
class Run:
    """One client run: its exit status and each stdout line with the time it arrived."""

    returncode: int
    lines: list[tuple[float, str]]
    stderr: str
    elapsed: float
    notes: list[str] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def json_events(self) -> list[dict[str, Any]]:
        """The JSON objects among the stdout lines, each with the time its line arrived under C{"_at"}."""
        events = []
        for at, line in self.lines:
            if line.startswith("{"):
                event = json.loads(line)
                event["_at"] = at
                events.append(event)
        return events


def run_client(argv: list[str], env: dict[str, str], cwd: Path, stdin: str | None = None) -> Run:
    """Run a client for at most L{CLIENT_TIMEOUT} seconds, timing each line of its output as it arrives."""
    started = time.monotonic()
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    lines: list[tuple[float, str]] = []
    errors: list[str] = []

    def read_out() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))

    def read_err() -> None:
        assert process.stderr is not None
        errors.append(process.stderr.read())

    readers = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for reader in readers:
        reader.start()
    if stdin is not None:
        assert process.stdin is not None
        process.stdin.write(stdin)
        process.stdin.close()
    try:
        process.wait(CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        for reader in readers:
            reader.join(5)
        raise AssertionError(f"{argv[0]} still running after {CLIENT_TIMEOUT} s; stdout:\n"
                             + "\n".join(line for _, line in lines) + f"\nstderr:\n{''.join(errors)}") from None
    for reader in readers:
        reader.join(5)
    return Run(process.returncode, lines, "".join(errors), time.monotonic() - started)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "work"
    path.mkdir()
    yield path


# --- figures: each client's time to first text and to the last, printed after the session -------------

FIGURES: list[tuple[str, float, float, float]] = []


def record_figures(client: str, first_text: float, last_text: float, total: float) -> None:
    """Keep (client, first text, last text, whole run) in seconds from the client's start, for the summary."""
    FIGURES.append((client, first_text, last_text, total))


class _Summary:
    """A plugin printing the recorded figures in pytest's terminal summary."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not FIGURES:
            return
        terminalreporter.section("real clients: seconds from the client's start (first text / last text / whole run)")
        for client, first, last, total in FIGURES:
            terminalreporter.write_line(f"{client:<20} {first:6.2f} / {last:6.2f} / {total:6.2f}")


@pytest.fixture(scope="session", autouse=True)
def figures(request: pytest.FixtureRequest) -> None:
    """Registers the summary once per session."""
    if not request.config.pluginmanager.has_plugin("navtwist-agent-figures"):
        request.config.pluginmanager.register(_Summary(), "navtwist-agent-figures")
