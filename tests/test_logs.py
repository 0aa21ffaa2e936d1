"""The JSON-lines log: one compact object per event in the schema of docs/logging.md,
and a log file bounded in size and number of files."""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions

from navtwist.service.logs import Rotation, json_line, log_observer_for, log_record
from navtwist.service.server_tap import Options

TWISTD = Path(sys.executable).with_name("twistd")
TIMEOUT = 10.0
ROUTES = [{"name": "inference.local", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}]
FIXED = ["time", "level", "event", "namespace", "message"]


def _event(**fields: Any) -> dict[str, Any]:
    return {"log_format": "request route={route}", "log_level": LogLevel.info, "log_namespace": "navtwist.exchange",
            "log_time": 1_778_000_000.25, "log_logger": Logger(), "log_source": object(), "route": "r", **fields}


def test_fixed_keys_first_then_the_event_fields() -> None:
    record = json.loads(json_line(_event(event="request", status=502, candidates_tried=2, ttft_ms=12.5,
                                         fields={"route": "r", "models": ["a", "b"]}, cached=None)))
    assert record == {
        "time": "2026-05-05T16:53:20.250Z", "level": "info", "event": "request", "namespace": "navtwist.exchange",
        "message": "request route=r", "route": "r", "status": 502, "candidates_tried": 2, "ttft_ms": 12.5,
        "fields": {"route": "r", "models": ["a", "b"]}, "cached": None,
    }
    assert list(record)[:5] == FIXED


def test_without_event_the_name_is_log() -> None:
    assert log_record(_event())["event"] == "log"
    assert log_record(_event(event=7))["event"] == "log"  # names are strings


@pytest.mark.parametrize("level", list(LogLevel.iterconstants()))
def test_the_level_is_its_name(level: Any) -> None:
    assert log_record(_event(log_level=level))["level"] == level.name


def test_twisted_keys_and_objects_are_left_out() -> None:
    record = log_record(_event(peer=object(), data=b"bytes", nan=float("nan"), nested={"x": object()},
                               keys={1: "x"}, log_flattened={"a": 1}, system="-", isError=0, format="%(x)s"))
    assert list(record) == [*FIXED, "route"]


def test_a_field_named_like_a_fixed_key_does_not_replace_it() -> None:
    record = log_record(_event(level="ignored", namespace="ignored", time="ignored"))
    assert (record["level"], record["namespace"], record["time"]) == ("info", "navtwist.exchange",
                                                                      "2026-05-05T16:53:20.250Z")


def test_a_failure_is_a_traceback_next_to_the_message() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    record = log_record(_event(log_format="hook {route} failed", log_failure=failure, log_level=LogLevel.critical))
    assert record["message"] == "hook r failed" and record["level"] == "critical"
    assert record["traceback"].startswith("Traceback") and "ValueError: boom" in record["traceback"]


def test_legacy_events_get_the_same_schema() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        legacy_log.msg("ProxyFactory starting on 3128")
        try:
            1 / 0
        except ZeroDivisionError:
            legacy_log.err(None, "Unhandled error in Deferred")
    finally:
        globalLogPublisher.removeObserver(events.append)
    started, error = (log_record(e) for e in events)
    assert {k: started[k] for k in ("level", "event", "message")} == {
        "level": "info", "event": "log", "message": "ProxyFactory starting on 3128"}
    assert list(started) == FIXED
    assert (error["level"], error["message"]) == ("critical", "Unhandled error in Deferred")
    assert "ZeroDivisionError" in error["traceback"]


def test_a_line_is_compact_ascii_and_leaves_the_event_alone() -> None:
    event = _event(event="request", route="r\u2028x → y\n", status=200)
    before = dict(event)
    line = json_line(event)
    assert line.isascii() and line.endswith("}\n") and line.count("\n") == 1
    assert ", " not in line and '": ' not in line
    assert len(line) < 250, line  # Twisted's eventAsJSON wrote about 1.5 KB for such an event
    assert event == before
    assert json.loads(line)["route"] == "r\u2028x → y\n"


def test_an_event_that_cannot_be_written_is_still_a_line() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    # Twisted removes an observer that raises: the log must survive any event.
    line = json_line({"log_format": "{x}", "x": Unprintable(), "log_time": 1.0, "log_level": LogLevel.info})
    assert json.loads(line)["message"].startswith("Unable to format event")


# --- rotation ----------------------------------------------------------------------------


def test_rotation_is_bounded_in_size_and_files(tmp_path: Path, restore_signals: None) -> None:
    path = tmp_path / "navtwist.log"
    options = ServerOptions()
    options.parseOptions(["-n", "--logfile", str(path), "navtwist", "--listen", "tcp:0:interface=127.0.0.1"])
    observer = log_observer_for(options, Rotation(max_bytes=1000, keep=2))
    assert observer is not None
    try:
        for i in range(100):
            observer(_event(route=f"r{i}"))
    finally:
        observer.file.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["navtwist.log", "navtwist.log.1", "navtwist.log.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 1000 + 200  # rotated before the write that crosses the size
    assert json.loads(path.read_text().splitlines()[-1])["route"] == "r99"


def test_rotation_options(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--log-max-bytes", "5000", "--log-keep", "3"])
    assert (options["log-max-bytes"], options["log-keep"]) == (5000, 3)
    defaults = Options()
    defaults.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
    assert (defaults["log-max-bytes"], defaults["log-keep"]) == (Rotation.max_bytes, Rotation.keep)


# --- the real twistd ---------------------------------------------------------------------


@pytest.mark.integration
def test_a_request_is_one_request_event_in_the_log_file(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "navtwist.yaml"
    config.write_text(yaml.safe_dump({"routes": ROUTES, "listen": f"tcp:{port}:interface=127.0.0.1",
                                      "ca_dir": str(tmp_path / "ca"), "drain_timeout": 1}))
    logfile = tmp_path / "navtwist.log"
    process = subprocess.Popen([str(TWISTD), "-n", "--pidfile=", "--logfile", str(logfile), "navtwist",
                                "--config", str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not logfile.exists() or "navtwist listening on" not in logfile.read_text():
            assert process.poll() is None and time.monotonic() < deadline, logfile.read_text()
            time.sleep(0.05)
        verify = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.pem"))
        with httpx.Client(proxy=f"http://127.0.0.1:{port}", verify=verify, timeout=TIMEOUT, trust_env=False) as http:
            response = http.post("https://inference.local/v1/chat/completions",
                                 json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200
        while '"event":"request"' not in logfile.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)
    events = [json.loads(line) for line in logfile.read_text().splitlines()]
    assert all(list(e)[:5] == FIXED for e in events)
    [request] = [e for e in events if e["event"] == "request"]
    assert request["level"] == "info" and request["namespace"] == "navtwist.exchange"
    assert request["message"].startswith("request protocol=openai_chat_completions ")
    assert (request["route"], request["status"], request["outcome"]) == ("inference.local", 200, "ok")
    assert isinstance(request["duration_ms"], float)
    [listening] = [e for e in events if e["event"] == "listening"]
    assert listening["message"] == f"navtwist listening on 127.0.0.1:{port}"
    assert os.path.getsize(logfile) < 600 * len(events)


def test_twisteds_accept_lines_at_the_descriptor_limit_are_left_out() -> None:
    import io

    from navtwist.service.logs import JSONLinesObserver

    file = io.StringIO()
    observer = JSONLinesObserver(file)
    base = {"log_level": LogLevel.info, "log_namespace": "twisted.internet.tcp.Port", "log_time": 0.0}
    flood = [
        {"log_format": "EMFILE encountered; releasing reserved file descriptor."},
        {"log_format": "EMFILE recovery: Closed socket from {address}", "address": ["127.0.0.1", 4000]},
        {"log_format": "Re-reserving EMFILE recovery file descriptor."},
        {"log_format": "Could not accept new connection ({acceptError})", "acceptError": "EMFILE"},
    ]
    for event in flood * 100:
        observer({**base, **event})
    observer({**base, "log_format": "Could not accept new connection ({acceptError})", "acceptError": "ENOBUFS"})
    observer({**base, "log_format": "out of file descriptors: {counts}", "counts": "400 accept",
              "log_level": LogLevel.error, "log_namespace": "navtwist"})
    lines = [json.loads(line)["message"] for line in file.getvalue().splitlines()]
    assert lines == ["Could not accept new connection (ENOBUFS)", "out of file descriptors: 400 accept"]
