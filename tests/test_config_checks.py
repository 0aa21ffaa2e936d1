"""Config checks that stop start-up with one line: endpoint strings, colliding
listeners, duplicate YAML keys, and what empty lists mean."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from navtwist.config import ConfigError, load_config, parse_config, with_overrides

ROUTE = {"name": "inference.local", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}


def _doc(**changes: Any) -> dict[str, Any]:
    return {"routes": [dict(ROUTE)], **changes}


def _error(document: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(document, {})
    text = str(info.value)
    assert "\n" not in text
    return text


# --- endpoint strings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("tcp:abc", "port 'abc' is not a number; write e.g. tcp:3128:interface=127.0.0.1"),
        ("3128", "'3128' is a bare port, not an endpoint string; write e.g. tcp:3128:interface=127.0.0.1"),
        ("tcp:99999", "port 99999 is out of range (0-65535)"),
        ("tcp:3128:interfce=127.0.0.1", "unknown parameter 'interfce'"),
        ("tcp:3128:interface=::1", r"escape each ':' of an IPv6 interface with a backslash, e.g. tcp6:3128:interface=\:\:1"),
        ("htp:3128", "unknown endpoint type 'htp'"),
    ],
)
@pytest.mark.parametrize("key", ["listen", "admin_listen"])
def test_bad_endpoint_strings_name_the_key_and_the_fix(key: str, listen: str, message: str) -> None:
    text = _error(_doc(**{key: listen}))
    assert text.startswith(f"{key}: {listen!r}"), text
    assert message in text, text


@pytest.mark.parametrize(
    "listen",
    ["tcp:3128:interface=127.0.0.1", "tcp:0", r"tcp6:3128:interface=\:\:1", "unix:/run/navtwist/proxy.sock",
     # systemd's socket exists only once systemd starts navtwist: not checkable before.
     "systemd:domain=INET:index=0"],
)
def test_good_endpoint_strings_are_accepted(listen: str) -> None:
    assert parse_config(_doc(listen=listen), {}).listen == listen


def test_command_line_listen_is_checked_too() -> None:
    config = parse_config(_doc(), {})
    with pytest.raises(ConfigError, match=r"^listen: '3128' is a bare port"):
        with_overrides(config, "3128", None)


@pytest.mark.parametrize(
    ("listen", "admin"),
    [
        ("tcp:3128:interface=127.0.0.1", "tcp:3128:interface=127.0.0.1"),
        ("tcp:3128", "tcp:3128:interface=127.0.0.1"),  # all interfaces include loopback
        ("tcp:3128:interface=127.0.0.1", r"tcp6:3128:interface=\:\:"),
        ("unix:/tmp/n.sock", "unix:/tmp/n.sock"),
    ],
)
def test_admin_listen_must_differ_from_listen(listen: str, admin: str) -> None:
    text = _error(_doc(listen=listen, admin_listen=admin))
    assert text.startswith("admin_listen: "), text
    assert "same address as listen" in text and "tcp:9128:interface=127.0.0.1" in text, text


def test_admin_listen_colliding_with_a_command_line_listen() -> None:
    config = parse_config(_doc(admin_listen="tcp:9128:interface=127.0.0.1"), {})
    with pytest.raises(ConfigError, match="^admin_listen: .*same address as listen"):
        with_overrides(config, "tcp:9128:interface=127.0.0.1", None)


@pytest.mark.parametrize(
    ("listen", "admin"),
    [("tcp:3128:interface=127.0.0.1", "tcp:9128:interface=127.0.0.1"),
     ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"),  # each gets its own free port
     ("tcp:3128:interface=127.0.0.1", "tcp:3128:interface=127.0.0.2")],
)
def test_distinct_listeners_are_accepted(listen: str, admin: str) -> None:
    assert parse_config(_doc(listen=listen, admin_listen=admin), {}).admin_listen == admin


# --- YAML ------------------------------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "navtwist.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(str(path), {})


SECOND_ROUTES = """\
routes:
  - {name: a, endpoint: "mock://", model: m, protocols: [openai_chat_completions]}
drain_timeout: 5
routes:
  - {name: b, endpoint: "mock://", model: m, protocols: [openai_chat_completions]}
"""


def test_a_duplicate_key_is_an_error_naming_the_key_and_lines(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, SECOND_ROUTES)
    assert str(info.value) == (
        f"config {tmp_path / 'navtwist.yaml'}: line 4: invalid YAML: duplicate key 'routes' (first on line 1)"
    )


def test_a_duplicate_key_inside_a_route_is_an_error(tmp_path: Path) -> None:
    text = 'routes:\n  - name: a\n    endpoint: "mock://"\n    model: m\n    model: n\n    protocols: [openai_chat_completions]\n'
    with pytest.raises(ConfigError, match=r"line 5: invalid YAML: duplicate key 'model' \(first on line 4\)$"):
        _load(tmp_path, text)


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    text = ('base: &base {endpoint: "mock://", model: m, protocols: [openai_chat_completions]}\n'
            "routes:\n  - <<: *base\n    name: a\n    model: n\n")
    with pytest.raises(ConfigError, match=r"^config .*: base: unknown key"):  # past the YAML stage
        _load(tmp_path, text)


# --- empty lists -------------------------------------------------------------------------------


def test_an_empty_plugins_list_is_the_default() -> None:
    assert parse_config(_doc(plugins=[]), {}).plugins == ()


def test_an_empty_fallback_list_means_no_fallback() -> None:
    assert parse_config({"routes": [{**ROUTE, "fallback": []}]}, {}).routes[0].fallback == ()


def test_an_empty_models_list_is_refused_with_the_reason() -> None:
    text = _error({"routes": [{**ROUTE, "models": []}]})
    assert text == ("routes[0].models: must not be empty: leave the key out to make the route its protocols' "
                    "default, or list the model names it answers to")


def test_a_duplicate_key_on_one_line_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 1: invalid YAML: duplicate key 'drain_timeout' \(first on line 1\)"):
        _load(tmp_path, "{drain_timeout: 1, drain_timeout: 2}\n")
