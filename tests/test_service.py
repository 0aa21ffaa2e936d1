"""Running navtwist as a service: JSON-lines logs, the daemon's pidfile and
stop, and the systemd and Kubernetes examples in docs/.

Everything runs on 127.0.0.1; every wait is bounded by TIMEOUT.
"""
from __future__ import annotations

import configparser
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogLevel
from twisted.python.failure import Failure
from twisted.python.systemd import ListenFDs
from twisted.scripts.twistd import ServerOptions

from navtwist.config import Config, parse_config
from navtwist.service.logs import TwistdLogging, json_line, log_observer_for, log_path_for, twistd_service
from navtwist.service.sandbox_env import proxy_url_from_listen, sandbox_variables

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "docs" / "systemd"
SIDECAR = ROOT / "docs" / "kubernetes" / "sidecar.yaml"
TWISTD = Path(sys.executable).with_name("twistd")
TIMEOUT = 10.0
DRAIN_TIMEOUT_DEFAULT = {f.name: f.default for f in dataclasses.fields(Config)}.get("drain_timeout", 30.0)
MOCK_ROUTES = [{"name": "inference.local", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}]


# --- helpers ---------------------------------------------------------------------------


def _unit(name: str) -> configparser.ConfigParser:
    """A systemd unit file as INI: repeated keys allowed (the last wins), no interpolation."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((SYSTEMD / name).read_text(encoding="utf-8"), source=name)
    return parser


def _sidecar() -> dict[str, dict[str, Any]]:
    with open(SIDECAR, encoding="utf-8") as f:
        documents = [d for d in yaml.safe_load_all(f) if d]
    return {d["kind"]: d for d in documents}


def _option_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _write_config(path: Path, **config: Any) -> Path:
    path.write_text(yaml.safe_dump({"routes": MOCK_ROUTES, **config}), encoding="utf-8")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        time.sleep(0.05)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Whether C{pid} is a running process (a zombie counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _parse_twistd(argv: list[str], config: Path) -> ServerOptions:
    """twistd's parse of a unit's command line, with its --config replaced by C{config}."""
    argv = list(argv)
    argv[argv.index("--config") + 1] = str(config)
    options = ServerOptions()
    options.parseOptions(argv)
    return options


# --- systemd units ---------------------------------------------------------------------


def test_service_unit_runs_twistd_in_the_foreground_hardened(tmp_path: Path) -> None:
    unit = _unit("navtwist.service")
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    s = unit["Service"]
    assert s["Type"] == "simple"
    argv = shlex.split(s["ExecStart"])
    assert argv[0].endswith("/twistd") and argv[1] == "-n"
    assert "--pidfile=" in argv[: argv.index("navtwist")]
    assert _option_after(argv, "--config") == "/etc/navtwist/navtwist.yaml"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["KillSignal"] == "SIGTERM"
    assert float(s["TimeoutStopSec"]) > DRAIN_TIMEOUT_DEFAULT
    assert s["Restart"] == "on-failure"
    assert s["User"] and s["User"] != "root"
    assert "navtwist" in s["StateDirectory"].split()
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "CapabilityBoundingSet": ""}.items():
        assert s[key] == value, key
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # The command line is one twistd accepts: foreground, no pidfile.
    options = _parse_twistd(argv[1:], _write_config(tmp_path / "c.yaml", ca_dir=str(tmp_path / "ca")))
    assert options["nodaemon"] and not options["pidfile"] and options.subCommand == "navtwist"


def test_socket_unit_listens_on_the_proxy_address() -> None:
    unit = _unit("navtwist.socket")
    assert {"Unit", "Socket", "Install"} <= set(unit.sections())
    assert unit["Socket"]["ListenStream"] == "127.0.0.1:3128"
    assert unit["Socket"]["Service"] == "navtwist-socket.service"
    assert unit["Install"]["WantedBy"] == "sockets.target"


def test_socket_activated_service_adopts_the_socket(tmp_path: Path) -> None:
    unit = _unit("navtwist-socket.service")
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    assert "navtwist.socket" in unit["Unit"]["Requires"].split()
    s = unit["Service"]
    argv = shlex.split(s["ExecStart"])
    assert argv[0].endswith("/twistd") and argv[1] == "-n"
    listen = _option_after(argv, "--listen")
    assert listen.startswith("systemd:")
    plain = _unit("navtwist.service")["Service"]
    for key in ("User", "ExecReload", "KillSignal", "TimeoutStopSec", "Restart", "StateDirectory",
                "NoNewPrivileges", "ProtectSystem"):
        assert s[key] == plain[key], key
    options = _parse_twistd(argv[1:], _write_config(tmp_path / "c.yaml", ca_dir=str(tmp_path / "ca")))
    assert options.subOptions["navtwist-config"].listen == listen


def test_systemd_endpoint_string_is_valid_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    listen = _option_after(shlex.split(_unit("navtwist-socket.service")["Service"]["ExecStart"]), "--listen")
    parser = endpoints._SystemdParser
    # Without inherited descriptors it fails for their lack only, not for its syntax.
    monkeypatch.setattr(parser, "_sddaemon", ListenFDs([], []))
    with pytest.raises(IndexError):
        endpoints.serverFromString(MemoryReactor(), listen)
    # With the one socket systemd passes, it adopts it.
    monkeypatch.setattr(parser, "_sddaemon", ListenFDs([3], ["navtwist.socket"]))
    endpoint = endpoints.serverFromString(MemoryReactor(), listen)
    assert isinstance(endpoint, endpoints.AdoptedStreamServerEndpoint)
    assert (endpoint.fileno, endpoint.addressFamily) == (3, socket.AF_INET)


# --- Kubernetes sidecar ------------------------------------------------------------------


def test_sidecar_manifests_parse_with_the_expected_containers() -> None:
    docs = _sidecar()
    assert set(docs) == {"Secret", "ConfigMap", "Pod"}
    pod = docs["Pod"]["spec"]
    init = {c["name"]: c for c in pod["initContainers"]}
    main = {c["name"]: c for c in pod["containers"]}
    assert list(init) == ["navtwist-ca", "navtwist"] and list(main) == ["agent"]
    sidecar, agent = init["navtwist"], main["agent"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    command = sidecar["command"]
    assert command[:2] == ["twistd", "-n"] and "navtwist" in command
    assert init["navtwist-ca"]["command"][:2] == ["navtwist", "env"]
    config_path = _option_after(command, "--config")
    assert _option_after(init["navtwist-ca"]["command"], "--config") == config_path
    config_data = yaml.safe_load(docs["ConfigMap"]["data"][Path(config_path).name])
    # Config and CA mounts.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["navtwist-config"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert "emptyDir" in volumes["navtwist-ca"]
    for container in init.values():
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["navtwist-config"]["mountPath"] == str(Path(config_path).parent)
        assert mounts["navtwist-ca"]["mountPath"] == config_data["ca_dir"]
        assert not mounts["navtwist-ca"].get("readOnly")
    [agent_mount] = agent["volumeMounts"]
    assert agent_mount == {"name": "navtwist-ca", "mountPath": config_data["ca_dir"], "readOnly": True}
    # The key: Secret -> env -> api_key_env; the agent never sees it.
    [route] = config_data["routes"]
    [key_env] = [e for e in sidecar["env"] if e["name"] == route["api_key_env"]]
    ref = key_env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == docs["Secret"]["metadata"]["name"] and ref["key"] in docs["Secret"]["stringData"]
    assert route["api_key_env"] not in {e["name"] for e in agent["env"]}
    # Drain fits in the grace period.
    assert pod["terminationGracePeriodSeconds"] > config_data.get("drain_timeout", DRAIN_TIMEOUT_DEFAULT)


def test_sidecar_probes_use_the_admin_endpoint() -> None:
    docs = _sidecar()
    sidecar = {c["name"]: c for c in docs["Pod"]["spec"]["initContainers"]}["navtwist"]
    config_data = yaml.safe_load(docs["ConfigMap"]["data"]["navtwist.yaml"])
    assert config_data["admin_listen"] == "tcp:9128:interface=127.0.0.1"
    paths = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in paths.items():
        command = sidecar[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"]
        assert f"'http://127.0.0.1:9128{path}'" in command[2]
        compile(command[2], probe, "exec")


def test_agent_environment_is_what_navtwist_env_prints() -> None:
    docs = _sidecar()
    agent = docs["Pod"]["spec"]["containers"][0]
    config = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["navtwist.yaml"]), {}, require_keys=False)
    ca_dir = Path(config.ca_dir)
    expected = sandbox_variables(proxy_url_from_listen(config.listen).url, ca_dir / "bundle.pem", ca_dir / "ca.pem")
    env = {e["name"]: e["value"] for e in agent["env"]}
    assert {name: env.get(name) for name in expected} == expected
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:3128"


def test_configmap_config_parses() -> None:
    text = _sidecar()["ConfigMap"]["data"]["navtwist.yaml"]
    config = parse_config(yaml.safe_load(text), {"NVIDIA_API_KEY": "nvapi-test"})
    assert config.listen == "tcp:3128:interface=127.0.0.1"
    assert config.ca_dir == "/var/lib/navtwist/ca"
    assert config.admin_listen == "tcp:9128:interface=127.0.0.1"
    assert [route.api_key for route in config.routes] == ["nvapi-test"]


# --- navtwist/logs.py ----------------------------------------------------------------


def test_json_line_is_one_line_with_the_rendered_text() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        failure = Failure()
    event = {"log_format": "request route={route} status={status}", "route": "r\nx", "status": 502,
             "log_level": LogLevel.error, "log_namespace": "navtwist.exchange", "log_time": 1.0,
             "log_failure": failure, "log_logger": object()}
    line = json_line(event)
    assert line.endswith("\n") and line.count("\n") == 1 and "\x1e" not in line
    data = json.loads(line)
    assert data["level"] == "error" and data["namespace"] == "navtwist.exchange"
    assert data["message"] == "request route=r\nx status=502"
    assert "ValueError: boom" in data["traceback"]
    assert data["status"] == 502 and data["route"] == "r\nx"
    assert not [key for key in data if key.startswith("log_")]
    assert "log_flattened" not in event and "message" not in event  # observers share events


def _twistd_options(tmp_path: Path, *argv: str) -> ServerOptions:
    config = _write_config(tmp_path / "c.yaml", ca_dir=str(tmp_path / "ca"))
    options = ServerOptions()
    options.parseOptions([*argv, "navtwist", "--config", str(config)])
    assert options.subOptions.parent is options  # what makeService passes on
    return options


@pytest.mark.parametrize(
    "argv, expected",
    [
        ((), "twistd.log"),  # a daemon: twistd's default log file
        (("--logfile", "x/navtwist.log"), "x/navtwist.log"),
        (("-n", "--logfile", "x/navtwist.log"), "x/navtwist.log"),
        (("-n",), None),  # foreground: twistd's text on stdout
        (("-n", "--logfile", "-"), None),
        (("--syslog",), None),
        (("--logger", "twisted.logger.textFileLogObserver"), None),
    ],
)
def test_json_log_file_only_where_twistd_would_log_to_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: tuple[str, ...], expected: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    path = log_path_for(_twistd_options(tmp_path, *argv))
    assert path == (None if expected is None else str(tmp_path / expected))
    assert log_path_for(None) is None  # not under twistd


def test_application_gets_the_json_observer(tmp_path: Path, restore_signals: None) -> None:
    log_path = tmp_path / "navtwist.log"
    application = service.Application("navtwist")
    top = twistd_service(service.MultiService(), _twistd_options(tmp_path, "--logfile", str(log_path)))
    top.setServiceParent(application)
    observer = application.getComponent(ILogObserver)
    assert observer is top.observer is not None
    try:
        observer({"log_format": "hello {who}", "who": "world", "log_level": LogLevel.info,
                  "log_namespace": "test", "log_time": 1.0})
    finally:
        observer.file.close()
    [line] = log_path.read_text().splitlines()
    assert json.loads(line)["message"] == "hello world"
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600  # a daemon's umask, 077
    assert signal.getsignal(signal.SIGUSR1) not in (None, signal.SIG_DFL)  # rotation, as twistd's


def test_no_observer_outside_an_application_or_in_the_foreground(tmp_path: Path) -> None:
    under_service = TwistdLogging(_twistd_options(tmp_path, "--logfile", str(tmp_path / "a.log")))
    under_service.setServiceParent(service.MultiService())
    foreground = TwistdLogging(_twistd_options(tmp_path, "-n"))
    application = service.Application("navtwist")
    foreground.setServiceParent(application)
    assert under_service.observer is None and foreground.observer is None
    assert application.getComponent(ILogObserver) is None
    assert not (tmp_path / "a.log").exists()
    assert log_observer_for(None) is None


# --- the real twistd ------------------------------------------------------------------


def _json_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\x1e" not in text
    lines = text.splitlines()
    for line in lines:  # text lines mean twistd picked its own observer
        assert line.startswith("{"), f"not a JSON line (does makeService return navtwist.service.logs.twistd_service?): {line!r}"
    events = [json.loads(line) for line in lines]
    for event in events:
        assert list(event)[:5] == ["time", "level", "event", "namespace", "message"], event
    return events


@pytest.mark.integration
def test_daemon_writes_pidfile_and_json_log_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    config = _write_config(tmp_path / "navtwist.yaml", listen=f"tcp:{port}:interface=127.0.0.1",
                           ca_dir=str(tmp_path / "ca"))
    run = tmp_path / "run"
    run.mkdir()
    pidfile, logfile = run / "navtwist.pid", run / "navtwist.log"
    pid = None
    with open(tmp_path / "launcher.out", "wb") as out:
        launcher = subprocess.Popen(
            [str(TWISTD), "--pidfile", pidfile.name, "--logfile", logfile.name, "--umask", "077",
             "navtwist", "--config", str(config)],
            cwd=run, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        # The launching process exits once the daemon reports it started.
        assert launcher.wait(TIMEOUT) == 0, (tmp_path / "launcher.out").read_text()
        _wait(pidfile.exists, "pidfile")
        pid = int(pidfile.read_text())
        assert pid != launcher.pid and _alive(pid)
        _wait(lambda: _accepts(port), f"connection to port {port}")
        _wait(lambda: f"ProxyFactory starting on {port}" in logfile.read_text(), "listening logged")
        events = _json_lines(logfile)
        texts = [event["message"] for event in events]
        assert f"ProxyFactory starting on {port}" in texts  # Twisted's own text logging, as JSON
        assert any(event["namespace"] == "navtwist" for event in events)
        assert stat.S_IMODE(logfile.stat().st_mode) == 0o600

        os.kill(pid, signal.SIGTERM)
        _wait(lambda: not _alive(pid), "exit after SIGTERM")
        _wait(lambda: not pidfile.exists(), "pidfile removal")
        events = _json_lines(logfile)
        assert events[-1]["message"] == "Server Shut Down."
        assert not any(e["level"] in ("error", "critical") for e in events), logfile.read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(TIMEOUT)
        if pid is None and pidfile.exists():
            pid = int(pidfile.read_text())
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _foreground(argv: list[str], log: Path, **popen: Any) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, **popen)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(TIMEOUT)
            raise AssertionError("twistd ignored SIGTERM") from None


@pytest.mark.integration
def test_sidecar_probes_pass_against_the_admin_endpoint(tmp_path: Path) -> None:
    """The probe commands of docs/kubernetes/sidecar.yaml, against a real navtwist."""
    sidecar = {c["name"]: c for c in _sidecar()["Pod"]["spec"]["initContainers"]}["navtwist"]
    port, admin = _free_port(), _free_port()
    config = _write_config(tmp_path / "navtwist.yaml", listen=f"tcp:{port}:interface=127.0.0.1",
                           admin_listen=f"tcp:{admin}:interface=127.0.0.1", ca_dir=str(tmp_path / "ca"))
    log = tmp_path / "twistd.log"
    process = _foreground([str(TWISTD), "-n", "--pidfile=", "navtwist", "--config", str(config)], log, cwd=tmp_path)

    def probe(name: str) -> bool:
        code = sidecar[name]["exec"]["command"][2].replace(":9128/", f":{admin}/")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=TIMEOUT).returncode == 0

    try:
        _wait(lambda: process.poll() is None and probe("startupProbe"), f"readiness; log:\n{log.read_text()}")
        assert probe("readinessProbe") and probe("livenessProbe")
    finally:
        _stop(process)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_socket_activation_adopts_the_inherited_socket(tmp_path: Path) -> None:
    """The socket unit's ExecStart, launched as systemd would: on the first connection,
    with the listening socket as fd 3 (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES)."""
    argv = shlex.split(_unit("navtwist-socket.service")["Service"]["ExecStart"])
    port = _free_port()
    config = _write_config(tmp_path / "navtwist.yaml", listen=f"tcp:{port}:interface=127.0.0.1",
                           ca_dir=str(tmp_path / "ca"))
    argv = [str(TWISTD), *argv[1:]]
    argv[argv.index("--config") + 1] = str(config)
    log = tmp_path / "twistd.log"
    # It passes the launched process only the environment it is told to.
    setenv = [f"--setenv={name}" for name in ("PATH", "HOME", "PYTHONPATH") if name in os.environ]
    process = _foreground(
        ["systemd-socket-activate", "--listen", f"127.0.0.1:{port}", "--fdname", "navtwist.socket",
         *setenv, "--setenv=PYTHONUNBUFFERED=1", *argv],
        log, cwd=tmp_path,
    )
    try:
        _wait(lambda: "Listening on" in log.read_text() or process.poll() is not None,
              "systemd-socket-activate listening")
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            # Anything but inference.local is denied by default: the answer is navtwist's.
            sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 403 "), (answer, log.read_text())
        assert f"starting on {port}" in log.read_text()
    finally:
        _stop(process)
    assert "Traceback" not in log.read_text(), log.read_text()
