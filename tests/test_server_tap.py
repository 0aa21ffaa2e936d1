"""The twistd plugin: discovery, options, and the service it builds."""
from __future__ import annotations

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins

from conftest import running_service
from navtwist.service.server_tap import Options, make_service


def test_twistd_finds_the_navtwist_plugin(restore_signals: None) -> None:  # asking for them quiets Ctrl-C
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert makers["navtwist"].options is Options


def test_bad_config_is_one_line_naming_the_key_not_a_usage_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "navtwist.yaml"
    path.write_text("routes:\n  - name: x\n    endpoint: http://h/v1\n    model: m\n    protocols: [nope]\n    api_key: k\n")
    # Not a UsageError: twistd prints its whole option summary above those.
    with pytest.raises(SystemExit) as info:
        Options().parseOptions(["--config", str(path)])
    assert str(info.value.code).startswith(f"navtwist: config {path}: routes[0].protocols[0]: unknown protocol 'nope'")


def test_command_line_overrides_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "navtwist.yaml"
    path.write_text("routes:\n  - {name: x, endpoint: 'mock://', model: m, protocols: [openai_chat_completions]}\n")
    options = Options()
    options.parseOptions(["--config", str(path), "--listen", "tcp:0:interface=127.0.0.1", "--ca-dir", str(tmp_path / "ca")])
    config = options["navtwist-config"]
    assert config.listen == "tcp:0:interface=127.0.0.1" and config.ca_dir == str(tmp_path / "ca")


def test_service_listens_on_the_configured_endpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with running_service("--listen", "tcp:3999:interface=127.0.0.1", "--ca-dir", str(tmp_path / "ca")) as reactor:
        [(port, factory, _backlog, interface)] = reactor.tcpServers
        assert (port, interface) == (3999, "127.0.0.1")
        assert (tmp_path / "ca" / "ca.pem").exists()


def test_unusable_ca_dir_is_a_one_line_exit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "ca.key").write_text("not a key")
    options = Options()
    options.parseOptions(["--ca-dir", str(tmp_path / "ca")])
    with pytest.raises(SystemExit, match="navtwist: .*ca"):
        make_service(options["navtwist-config"], MemoryReactorClock())


def test_plugin_options_follow_twisteds_conventions(capsys: pytest.CaptureFixture[str]) -> None:
    from navtwist.service.cli import EnvOptions

    options = Options()
    assert options.synopsis and options.longdesc
    # The config options are defined once and shared with `navtwist env`.
    shared = {"config", "ca-dir"}
    assert shared <= {p[0] for p in _params(Options)} & {p[0] for p in _params(EnvOptions)}
    with pytest.raises(SystemExit) as exit:
        options.parseOptions(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("navtwist ")


def _params(cls: type) -> list[list[object]]:
    from twisted.python.reflect import accumulateClassList

    found: list[list[object]] = []
    accumulateClassList(cls, "optParameters", found)
    return found
