"""Start-up: one clear line for every mistake an operator makes, never twistd's
option summary or a traceback; where navtwist listens, logged first.

Unit tests use MemoryReactor; the integration tests run the real twistd on
127.0.0.1 only, every wait bounded.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.application.service import IServiceMaker
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.plugin import getPlugins
from twisted.python.systemd import ListenFDs
from twisted.scripts.twistd import ServerOptions

from navtwist.service.cli import main as navtwist_main
from navtwist.config import parse_config
from navtwist.service.listen import Listener, check_can_listen
from navtwist.service.server_tap import Options
from navtwist.service.interrupts import INTERRUPTED, quiet_until_running
from navtwist.service.startup import check_before_start

TWISTD = Path(sys.executable).with_name("twistd")
TIMEOUT = 10.0
ROUTES = [{"name": "inference.local", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}]


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the listener ----------------------------------------------------------------------------


class _Port:
    def __init__(self, address: Any) -> None:
        self.address = address
        self.listening = True

    def getHost(self) -> Any:
        return self.address

    def stopListening(self) -> None:
        self.listening = False


class _BindingReactor(MemoryReactor):
    """Reports the address bound as a real reactor does (MemoryReactor's says 0.0.0.0 for every
    IPv4 interface); port 0 becomes 40000, as if the system had picked it."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> _Port:
        super().listenTCP(port, factory, backlog, interface)
        kind = IPv6Address if ":" in interface else IPv4Address
        return _Port(kind("TCP", interface or "0.0.0.0", port or 40000))


def _listen(description: str, key: str = "listen", label: str = "navtwist",
            reactor: MemoryReactor | None = None) -> tuple[Listener, list[dict[str, Any]]]:
    listener = Listener(key, description, Factory(), reactor or _BindingReactor(), label)
    with capturedLogs() as events:
        listener.startService()
    return listener, events


def test_the_listener_logs_where_it_listens() -> None:
    listener, events = _listen("tcp:3128:interface=127.0.0.1")
    assert [formatEvent(e) for e in events] == ["navtwist listening on 127.0.0.1:3128"]
    assert events[0]["event"] == "listening"
    port = listener.port
    assert isinstance(port, _Port)
    listener.stopService()
    assert listener.port is None and not port.listening


def test_the_listener_logs_the_port_actually_bound() -> None:
    _, events = _listen("tcp:0:interface=127.0.0.1", "admin_listen", "navtwist admin")
    assert [formatEvent(e) for e in events] == ["navtwist admin listening on 127.0.0.1:40000"]


@pytest.mark.parametrize("description", ["tcp:3128:interface=127.0.0.1", r"tcp6:3128:interface=\:\:1",
                                         "unix:/tmp/navtwist-test.sock"])
def test_no_warning_for_loopback_or_unix_sockets(description: str) -> None:
    _, events = _listen(description)
    assert [e["log_level"] for e in events] == [LogLevel.info]


@pytest.mark.parametrize(
    ("description", "key", "shown"),
    [("tcp:3128", "listen", "0.0.0.0:3128"),
     ("tcp:3128:interface=0.0.0.0", "listen", "0.0.0.0:3128"),
     (r"tcp6:9128:interface=\:\:", "admin_listen", "[::]:9128"),
     ("tcp:3128:interface=192.0.2.7", "listen", "192.0.2.7:3128")],
)
def test_a_reachable_address_is_one_warning_about_credentials(description: str, key: str, shown: str) -> None:
    _, events = _listen(description, key)
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{key} {shown} is reachable from other hosts: navtwist injects API keys"), warnings
    assert "no untrusted host may reach this port" in warnings[0]


class _TakenReactor(MemoryReactor):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)))


def test_a_port_in_use_is_one_line_with_the_fix() -> None:
    with pytest.raises(SystemExit) as info:
        _listen("tcp:3128:interface=127.0.0.1", reactor=_TakenReactor())
    assert info.value.code == (
        "navtwist: cannot listen on 127.0.0.1:3128 (listen: tcp:3128:interface=127.0.0.1): the address is already "
        "in use; stop the process listening there, or choose another listen (or pass --listen)"
    )


def test_systemd_without_its_socket_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoints._SystemdParser, "_sddaemon", ListenFDs([], []))
    with pytest.raises(SystemExit, match=r"^navtwist: listen: 'systemd:domain=INET:index=0': systemd passed no such "
                                         r"socket; start navtwist through its \.socket unit"):
        Listener("listen", "systemd:domain=INET:index=0", Factory(), MemoryReactor(), "navtwist")


# --- checks before twistd forks ----------------------------------------------------------------


def test_check_can_listen_finds_a_port_in_use(listening_port: int) -> None:
    description = f"tcp:{listening_port}:interface=127.0.0.1"
    with pytest.raises(SystemExit) as info:
        check_can_listen("admin_listen", description)
    assert info.value.code == (
        f"navtwist: cannot listen on 127.0.0.1:{listening_port} (admin_listen: {description}): the address is "
        "already in use; stop the process listening there, or choose another admin_listen"
    )
    check_can_listen("listen", "tcp:0:interface=127.0.0.1")  # the system picks a free port
    check_can_listen("listen", f"tcp:{_free_port()}:interface=127.0.0.1")


def test_check_can_listen_finds_a_missing_socket_directory(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="its directory does not exist; create the directory first"):
        check_can_listen("listen", f"unix:{tmp_path}/missing/navtwist.sock")


def _twistd_options(*argv: str) -> ServerOptions:
    options = ServerOptions()
    options.parseOptions([*argv, "navtwist"])
    return options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("-n", "--pidfile", "{tmp}/run/x.pid"),
         "navtwist: cannot write the pidfile {tmp}/run/x.pid: the directory {tmp}/run does not exist; create it "
         "(or pass --pidfile= for none)"),
        (("--pidfile=", "--logfile", "{tmp}/log/x.log", "--rundir", "{tmp}/run"),
         "navtwist: cannot change to the --rundir {tmp}/run: it does not exist; create it"),
        (("-n", "--pidfile=", "--logfile", "{tmp}/log/x.log"),
         "navtwist: cannot write the log file {tmp}/log/x.log: the directory {tmp}/log does not exist; create it "
         "(or pass another --logfile)"),
    ],
)
def test_missing_pidfile_or_log_directories_are_one_line(tmp_path: Path, argv: tuple[str, ...], message: str) -> None:
    options = _twistd_options(*(a.format(tmp=tmp_path) for a in argv))
    config = parse_config({"routes": ROUTES, "listen": "tcp:0:interface=127.0.0.1"}, {})
    with pytest.raises(SystemExit) as info:
        check_before_start(config, options)
    assert info.value.code == message.format(tmp=tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "log").mkdir()
    check_before_start(config, options)


# --- Ctrl-C ----------------------------------------------------------------------------------------


@contextmanager
def _no_keyboard_interrupt() -> Iterator[None]:
    """A KeyboardInterrupt (which twistd shows as a traceback) fails the test instead of ending the run."""
    try:
        yield
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped: twistd would print a traceback")


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)  # the handler runs before this ends


def test_ctrl_c_once_twistd_chose_navtwist_is_one_line(restore_signals: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    [maker] = [m for m in getPlugins(IServiceMaker) if m.tapname == "navtwist"]
    assert maker.options is Options  # what twistd asks for once navtwist is the command
    with pytest.raises(SystemExit) as info, _no_keyboard_interrupt():
        _ctrl_c()
    assert info.value.code == INTERRUPTED
    assert capsys.readouterr().err == "navtwist: interrupted during start-up\n"


def test_the_reactor_gets_sigint_back_when_it_starts(restore_signals: None) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reactor = MemoryReactor()
    quiet_until_running(reactor)
    with pytest.raises(SystemExit), _no_keyboard_interrupt():
        _ctrl_c()
    # Just before the reactor installs its own handler (only over Python's default), the default is back.
    [(restore, args, kwargs)] = reactor.triggers["before"]["startup"]
    restore(*args, **kwargs)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored(restore_signals: None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reactor = MemoryReactor()
    quiet_until_running(reactor)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert not reactor.triggers


# --- navtwist env ------------------------------------------------------------------------------------


def test_navtwist_env_reports_a_bad_listen_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "navtwist.yaml"
    path.write_text(yaml.safe_dump({"routes": ROUTES, "listen": "tcp:abc", "ca_dir": str(tmp_path / "ca")}))
    assert navtwist_main(["env", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"navtwist env: config {path}: listen: 'tcp:abc': port 'abc' is not a number; write e.g. " \
                  "tcp:3128:interface=127.0.0.1\n"


# --- the real twistd ---------------------------------------------------------------------------------


def _run(tmp_path: Path, *argv: str, config: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """twistd ARGV navtwist --config C, run to completion (for starts that must fail)."""
    base = {"routes": ROUTES, "listen": f"tcp:{_free_port()}:interface=127.0.0.1", "ca_dir": str(tmp_path / "ca")}
    path = tmp_path / "navtwist.yaml"
    path.write_text(yaml.safe_dump({**base, **(config or {})}), encoding="utf-8")
    twistd_args = [a for a in argv if not a.startswith("navtwist:")]
    navtwist_args = [a.removeprefix("navtwist:") for a in argv if a.startswith("navtwist:")]
    return subprocess.run([str(TWISTD), *twistd_args, "navtwist", "--config", str(path), *navtwist_args],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path, stdin=subprocess.DEVNULL)


def _assert_one_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Exit non-zero, nothing on stdout, exactly one line on stderr matching C{expected}."""
    assert result.returncode != 0
    assert result.stdout == "", result.stdout
    assert re.fullmatch(expected + r"\n", result.stderr), result.stderr


FOREGROUND = ("-n", "--pidfile=")


@pytest.mark.integration
@pytest.mark.parametrize("mode", [FOREGROUND, ("--pidfile", "twistd.pid", "--logfile", "twistd.log")],
                         ids=["foreground", "daemon"])
def test_a_config_error_is_one_line_on_stderr_without_the_option_summary(tmp_path: Path,
                                                                         mode: tuple[str, ...]) -> None:
    result = _run(tmp_path, *mode, config={"routes": [{**ROUTES[0], "protocols": ["nope"]}]})
    _assert_one_line(result, re.escape(f"navtwist: config {tmp_path / 'navtwist.yaml'}: routes[0].protocols[0]: "
                                       "unknown protocol 'nope'") + ".*")
    assert not (tmp_path / "twistd.pid").exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("argv", "config", "expected"),
    [
        (("navtwist:--listen", "navtwist:3128"), {},
         r"navtwist: listen: '3128' is a bare port, not an endpoint string; write e\.g\. "
         r"tcp:3128:interface=127\.0\.0\.1"),
        ((), {"listen": "tcp:abc"}, r"navtwist: config .*: listen: 'tcp:abc': port 'abc' is not a number; .*"),
        ((), {"admin_listen": "tcp:9128:interface=::1"}, r"navtwist: config .*: admin_listen: .*escape each ':'.*"),
        ((), {"listen": "tcp:9128:interface=127.0.0.1", "admin_listen": "tcp:9128:interface=127.0.0.1"},
         r"navtwist: config .*: admin_listen: 'tcp:9128:interface=127\.0\.0\.1' is the same address as listen .*"),
    ],
    ids=["bare-port", "port-not-a-number", "ipv6-unescaped", "admin-is-listen"],
)
def test_bad_endpoints_are_one_line(tmp_path: Path, argv: tuple[str, ...], config: dict[str, Any],
                                    expected: str) -> None:
    _assert_one_line(_run(tmp_path, *FOREGROUND, *argv, config=config), expected)
    assert not (tmp_path / "ca").exists()  # refused before the CA was made


@pytest.mark.integration
@pytest.mark.parametrize("mode", [FOREGROUND, ("--pidfile", "twistd.pid", "--logfile", "twistd.log")],
                         ids=["foreground", "daemon"])
@pytest.mark.parametrize("key", ["listen", "admin_listen"])
def test_a_port_in_use_is_one_line(tmp_path: Path, listening_port: int, key: str, mode: tuple[str, ...]) -> None:
    taken = f"tcp:{listening_port}:interface=127.0.0.1"
    result = _run(tmp_path, *mode, config={key: taken})
    _assert_one_line(result, re.escape(f"navtwist: cannot listen on 127.0.0.1:{listening_port} ({key}: {taken}): "
                                       f"the address is already in use; stop the process listening there, or "
                                       f"choose another {key}") + ".*")
    assert not (tmp_path / "twistd.pid").exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("-n", "--pidfile", "run/twistd.pid"), r"navtwist: cannot write the pidfile .*/run/twistd\.pid: the "
                                                r"directory .*/run does not exist; create it \(or pass --pidfile= for none\)"),
        (("--pidfile=", "--logfile", "log/navtwist.log"), r"navtwist: cannot write the log file .*/log/navtwist\.log: "
                                                          r"the directory .*/log does not exist; create it .*"),
    ],
    ids=["pidfile", "logfile"],
)
def test_a_missing_directory_is_one_line(tmp_path: Path, argv: tuple[str, ...], expected: str) -> None:
    _assert_one_line(_run(tmp_path, *argv), expected)


@pytest.mark.integration
def test_first_lines_after_start_say_where_navtwist_listens(tmp_path: Path) -> None:
    path = tmp_path / "navtwist.yaml"
    path.write_text(yaml.safe_dump({"routes": ROUTES, "listen": "tcp:0:interface=127.0.0.1",
                                    "admin_listen": "tcp:0:interface=127.0.0.1", "ca_dir": str(tmp_path / "ca"),
                                    "drain_timeout": 1}))
    log = tmp_path / "twistd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(TWISTD), *FOREGROUND, "navtwist", "--config", str(path)], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + TIMEOUT
        while "navtwist admin listening on" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        text = log.read_text()
        after_start = text.split("reactor class:", 1)[1].splitlines()[1:]
        ours = [line.split("] ", 1)[1] for line in after_start if "[navtwist#" in line]
        assert re.fullmatch(r"navtwist listening on 127\.0\.0\.1:\d+", ours[0]), text
        assert re.fullmatch(r"navtwist admin listening on 127\.0\.0\.1:\d+", ours[1]), text
        proxy_port, admin_port = (int(line.rsplit(":", 1)[1]) for line in ours[:2])
        assert 0 not in (proxy_port, admin_port) and proxy_port != admin_port
        for port in (proxy_port, admin_port):  # the ports actually bound
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
        assert "reachable from other hosts" not in text
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)
    assert "Traceback" not in log.read_text()
