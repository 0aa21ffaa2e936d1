"""Starting and stopping the processes under test: the upstream, navtwist and mitmdump."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.measure import ProcStats

BENCH_DIR = Path(__file__).resolve().parent
TWISTD = Path(sys.executable).with_name("twistd")
MITMDUMP = Path(os.environ.get("BENCH_MITMDUMP", BENCH_DIR / ".venv-mitm" / "bin" / "mitmdump"))
START_TIMEOUT = 30.0


class Process:
    """A child process with its log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_path: Path, **popen: object) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdout=popen.pop("stdout", log), stderr=log,
                                          stdin=subprocess.DEVNULL, **popen)
        self.stats = ProcStats(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; log {self.log_path}:\n"
                               + self.log_path.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class Proxy(Process):
    """A proxy listening on 127.0.0.1:C{port}, whose clients trust C{ca_file}."""

    def __init__(self, name: str, argv: list[str], log_path: Path, port: int, ca_file: Path) -> None:
        super().__init__(name, argv, log_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.port = port
        self.ca_file = ca_file
        deadline = time.monotonic() + START_TIMEOUT
        while not (_accepts(port) and ca_file.exists()):
            self.check_alive()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} not listening on {port} after {START_TIMEOUT} s; see {log_path}")
            time.sleep(0.05)


def start_upstream(work: Path, cert: Path, key: Path, sndbuf: int | None = None) -> tuple[Process, dict[str, int]]:
    """The bench upstream (bench/upstream.py) and its ports: C{{"plain": ..., "tls": ..., "origin": ...}};
    C{sndbuf} caps its sockets' send buffers."""
    argv = [sys.executable, "-m", "bench.upstream", str(cert), str(key)] + ([str(sndbuf)] if sndbuf else [])
    process = Process("upstream", argv,
                      work / "upstream.log", stdout=subprocess.PIPE, cwd=BENCH_DIR.parent)
    line = process.popen.stdout.readline()
    if not line:
        process.check_alive()
    return process, json.loads(line)


def start_navtwist(work: Path, ports: dict[str, int], cert: Path | None = None, extra: dict | None = None) -> Proxy:
    """C{twistd -n navtwist} routing inference.local to the upstream, allowing tunnels to its TLS port and,
    given the upstream's C{cert}, intercepting its origin port (read-only, the origin verified against C{cert}).
    C{extra} is merged into the config's top level."""
    port = free_port()
    ca_dir = work / "navtwist-ca"
    config = {
        "listen": f"tcp:{port}:interface=127.0.0.1",
        "ca_dir": str(ca_dir),
        "routes": [{
            "name": "inference.local",
            "endpoint": f"http://127.0.0.1:{ports['plain']}/v1",
            "model": "m",
            "protocols": ["openai_chat_completions", "openai_embeddings"],
            "api_key": "sk-bench",
            "provider_type": "openai",
        }],
        "policy": {"allow": [f"127.0.0.1:{ports['tls']}"]},
        "limits": {"max_connections": 10000},
        **(extra or {}),
    }
    if cert is not None:
        config["policy"]["intercept"] = [
            {"host": "127.0.0.1", "port": ports["origin"], "access": "read-only", "upstream_ca": str(cert)}]
    config_path = work / "navtwist.yaml"
    config_path.write_text(yaml.safe_dump(config))
    argv = [str(TWISTD), "-n", "--pidfile=", "navtwist", "--config", str(config_path)]
    return Proxy("navtwist", argv, work / "navtwist.log", port, ca_dir / "ca.pem")


def start_mitmproxy(work: Path, ports: dict[str, int], cert: Path | None = None) -> Proxy:
    """mitmdump streaming every response, inference.local sent to the upstream by bench/mitm_addon.py,
    CONNECTs to the upstream's TLS port passed through untouched (C{ignore_hosts}); any other CONNECT
    (the origin port) intercepted, the origin verified against C{cert} when given."""
    port = free_port()
    confdir = work / "mitmproxy-conf"
    argv = [
        str(MITMDUMP), "--listen-host", "127.0.0.1", "--listen-port", str(port),
        "--set", f"confdir={confdir}",
        "--set", "connection_strategy=lazy",
        "--set", f"ignore_hosts=^127\\.0\\.0\\.1:{ports['tls']}$",
        "--set", "flow_detail=0", "--set", "termlog_verbosity=warn",
        "-s", str(BENCH_DIR / "mitm_addon.py"),
        "--set", f"bench_upstream=127.0.0.1:{ports['plain']}",
    ]
    if cert is not None:
        argv += ["--set", f"ssl_verify_upstream_trusted_ca={cert}"]
    return Proxy("mitmproxy", argv, work / "mitmproxy.log", port, confdir / "mitmproxy-ca-cert.pem")


def mitmproxy_version() -> str:
    if not MITMDUMP.exists():  # the single-scenario targets run without bench/.venv-mitm
        return "not installed"
    out = subprocess.run([str(MITMDUMP), "--version"], capture_output=True, text=True, timeout=60).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Mitmproxy:")), "?")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
