"""Tests for navtwist.config: parsing, validation, defaults and secrecy of keys."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from navtwist.config import (
    Config,
    ConfigError,
    Limits,
    Route,
    Timeouts,
    default_config,
    load_config,
    parse_config,
    with_overrides,
)
from navtwist.egress.policy import Policy
from navtwist.inference.protocols import PROTOCOLS

SECRET = "nvapi-TOPSECRET-0123456789"
ENV = {"NVIDIA_API_KEY": SECRET}


def _route(**changes: Any) -> dict[str, Any]:
    """A valid route; a change to None removes the key."""
    route: dict[str, Any] = {
        "name": "inference.local",
        "endpoint": "https://integrate.api.nvidia.com/v1",
        "model": "meta/llama-3.1-8b-instruct",
        "protocols": ["openai_chat_completions", "openai_completions"],
        "api_key_env": "NVIDIA_API_KEY",
        "provider_type": "nvidia",
    }
    route.update(changes)
    return {k: v for k, v in route.items() if v is not None}


def _doc(**changes: Any) -> dict[str, Any]:
    """A valid config document; a change to None removes the key."""
    doc: dict[str, Any] = {"routes": [_route()]}
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def _write(tmp_path: Any, text: str) -> str:
    path = tmp_path / "navtwist.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


OPENSHELL_ROUTES = """\
routes:
  - name: inference.local
    endpoint: https://integrate.api.nvidia.com/v1
    model: meta/llama-3.1-8b-instruct
    protocols:
      - openai_chat_completions
      - openai_completions
    api_key_env: NVIDIA_API_KEY
"""

FULL = """\
listen: "tcp:8443:interface=0.0.0.0"
ca_dir: "/var/lib/navtwist/ca"
routes:
  - name: inference.local
    endpoint: "https://integrate.api.nvidia.com/v1"
    model: "meta/llama-3.1-8b-instruct"
    protocols: [openai_chat_completions, openai_completions]
    api_key_env: NVIDIA_API_KEY
    provider_type: nvidia
    connect_timeout: 5
    first_byte_timeout: 120.5
    idle_timeout: 90
  - name: claude
    endpoint: "http://10.0.0.5:8080/anthropic"
    model: "claude-sonnet"
    protocols: [anthropic_messages]
    api_key: "literal-key"
    provider_type: anthropic
  - name: mock
    endpoint: "mock://"
    model: "navtwist-mock"
    protocols: [model_discovery]
limits:
  max_head_bytes: 8192
  max_headers: 50
  max_body_bytes: 1048576
  max_connections: 200
timeouts:
  head_read: 15
  tls_handshake: 5.5
  keepalive_idle: 30
  write_stall: 45
"""


def test_openshell_routes_only_file_uses_defaults(tmp_path: Any) -> None:
    config = load_config(_write(tmp_path, OPENSHELL_ROUTES), ENV)
    assert config.listen == "tcp:3128:interface=127.0.0.1"
    assert config.ca_dir == os.path.expanduser("~/.navtwist/ca")
    assert not config.ca_dir.startswith("~")
    assert config.limits == Limits(
        max_head_bytes=16384, max_headers=100, max_body_bytes=32 * 1024 * 1024, max_connections=10000
    )
    assert config.timeouts == Timeouts(head_read=30.0, tls_handshake=10.0, keepalive_idle=60.0, write_stall=60.0)
    assert config.routes == (
        Route(
            name="inference.local",
            endpoint="https://integrate.api.nvidia.com/v1",
            model="meta/llama-3.1-8b-instruct",
            protocols=("openai_chat_completions", "openai_completions"),
            api_key=SECRET,
            provider_type=None,
            connect_timeout=10.0,
            first_byte_timeout=300.0,
            idle_timeout=300.0,
        ),
    )


def test_full_file_parses_every_key(tmp_path: Any) -> None:
    config = load_config(_write(tmp_path, FULL), ENV)
    assert config.listen == "tcp:8443:interface=0.0.0.0"
    assert config.ca_dir == "/var/lib/navtwist/ca"
    nim, claude, mock = config.routes
    assert nim == Route(
        name="inference.local",
        endpoint="https://integrate.api.nvidia.com/v1",
        model="meta/llama-3.1-8b-instruct",
        protocols=("openai_chat_completions", "openai_completions"),
        api_key=SECRET,
        provider_type="nvidia",
        connect_timeout=5.0,
        first_byte_timeout=120.5,
        idle_timeout=90.0,
    )
    assert isinstance(nim.connect_timeout, float)
    assert (claude.endpoint, claude.api_key, claude.provider_type) == (
        "http://10.0.0.5:8080/anthropic",
        "literal-key",
        "anthropic",
    )
    assert claude.protocols == ("anthropic_messages",)
    assert (mock.api_key, mock.provider_type, mock.is_mock) == ("", None, True)
    assert not nim.is_mock and not claude.is_mock
    assert config.limits == Limits(max_head_bytes=8192, max_headers=50, max_body_bytes=1048576, max_connections=200)
    assert config.timeouts == Timeouts(head_read=15.0, tls_handshake=5.5, keepalive_idle=30.0, write_stall=45.0)


def test_null_values_mean_defaults() -> None:
    config = parse_config({**_doc(), "limits": None, "timeouts": None, "listen": None}, ENV)
    assert (config.limits, config.timeouts) == (Limits(), Timeouts())
    assert config.listen == Config(routes=()).listen
    route = parse_config(_doc(routes=[_route() | {"provider_type": None, "idle_timeout": None}]), ENV).routes[0]
    assert route.provider_type is None
    assert route.idle_timeout == 300.0


def test_policy_section_parses_allow_entries(tmp_path: Any) -> None:
    text = OPENSHELL_ROUTES + """\
policy:
  allow:
    - "API.GitHub.com:443"
    - "*.pythonhosted.org:443"
    - "pypi.org:*"
    - "[::1]:8443"
"""
    policy = load_config(_write(tmp_path, text), ENV).policy
    assert [(rule.host, rule.wildcard, rule.port) for rule in policy.rules] == [
        ("api.github.com", False, 443),
        ("pythonhosted.org", True, 443),
        ("pypi.org", False, None),
        ("::1", False, 8443),
    ]
    assert policy.allows("files.pythonhosted.org", 443)
    assert not policy.allows("api.github.com", 80)


@pytest.mark.parametrize("section", [None, {}, {"allow": None}, {"allow": []}])
def test_absent_or_empty_policy_allows_nothing(section: object) -> None:
    policy = parse_config(_doc(policy=section), ENV).policy
    assert policy == Policy() == Config(routes=()).policy
    assert not policy.allows("pypi.org", 443)


def test_mock_scheme_is_case_insensitive() -> None:
    route = parse_config(_doc(routes=[_route(endpoint="MOCK://", api_key_env=None)]), {}).routes[0]
    assert route.is_mock
    assert route.api_key == ""


@pytest.mark.parametrize(
    "endpoint",
    ["https://api.openai.com/v1", "http://localhost:8000", "http://[::1]:8080/v1", "https://h.example:443/a/b/"],
)
def test_accepted_endpoints(endpoint: str) -> None:
    assert parse_config(_doc(routes=[_route(endpoint=endpoint)]), ENV).routes[0].endpoint == endpoint


ERROR_CASES: list[tuple[str, object, str, str]] = [
    # (id, document, key path, part of the message)
    ("top-not-mapping", ["routes"], "top level", "expected a mapping, got a list"),
    ("top-unknown", _doc(proxy="x"), "proxy", "unknown key (allowed: listen, ca_dir, routes, limits, timeouts, policy, plugins, drain_timeout, admin_listen, ca_name_constraints, audit_log, credentials, upstream_proxy)"),
    ("routes-missing", {"listen": "tcp:3128"}, "routes", "required"),
    ("routes-empty", _doc(routes=[]), "routes", "must not be empty"),
    ("routes-mapping", _doc(routes={"name": "x"}), "routes", "expected a list, got a mapping"),
    ("route-not-mapping", _doc(routes=["inference.local"]), "routes[0]", "expected a mapping, got a string"),
    ("route-unknown", _doc(routes=[_route(timeout=5)]), "routes[0].timeout", "unknown key (allowed: name, endpoint"),
    ("second-route", _doc(routes=[_route(), _route(model=None)]), "routes[1].model", "required"),
    ("name-missing", _doc(routes=[_route(name=None)]), "routes[0].name", "required"),
    ("name-empty", _doc(routes=[_route(name="  ")]), "routes[0].name", "must not be empty"),
    ("name-number", _doc(routes=[_route(name=7)]), "routes[0].name", "expected a string, got an integer"),
    ("endpoint-missing", _doc(routes=[_route(endpoint=None)]), "routes[0].endpoint", "required"),
    ("endpoint-list", _doc(routes=[_route(endpoint=["x"])]), "routes[0].endpoint", "expected a string, got a list"),
    ("model-missing", _doc(routes=[_route(model=None)]), "routes[0].model", "required"),
    ("model-empty", _doc(routes=[_route(model="")]), "routes[0].model", "must not be empty"),
    ("model-number", _doc(routes=[_route(model=3.5)]), "routes[0].model", "expected a string, got a number"),
    ("protocols-missing", _doc(routes=[_route(protocols=None)]), "routes[0].protocols", "required"),
    ("protocols-empty", _doc(routes=[_route(protocols=[])]), "routes[0].protocols", "must not be empty"),
    (
        "protocols-string",
        _doc(routes=[_route(protocols="openai_completions")]),
        "routes[0].protocols",
        "expected a list, got a string",
    ),
    (
        "protocol-unknown",
        _doc(routes=[_route(protocols=["openai_completions", "foo"])]),
        "routes[0].protocols[1]",
        "unknown protocol 'foo' (known: " + ", ".join(PROTOCOLS) + ")",
    ),
    (
        "protocol-duplicate",
        _doc(routes=[_route(protocols=["openai_completions", "model_discovery", "openai_completions"])]),
        "routes[0].protocols[2]",
        "duplicate protocol 'openai_completions'",
    ),
    ("protocol-number", _doc(routes=[_route(protocols=[1])]), "routes[0].protocols[0]", "expected a string"),
    ("protocol-null", _doc(routes=[_route(protocols=[None])]), "routes[0].protocols[0]", "got null"),
    ("key-neither", _doc(routes=[_route(api_key_env=None)]), "routes[0]", "neither api_key nor api_key_env"),
    ("key-both", _doc(routes=[_route(api_key="k")]), "routes[0]", "both api_key and api_key_env"),
    ("key-empty", _doc(routes=[_route(api_key_env=None, api_key="")]), "routes[0].api_key", "must not be empty"),
    (
        "key-env-unset",
        _doc(routes=[_route(api_key_env="MY_UNSET_KEY")]),
        "routes[0].api_key_env",
        "environment variable 'MY_UNSET_KEY' is not set or is empty",
    ),
    (
        "key-env-empty-value",
        _doc(routes=[_route(api_key_env="EMPTY_KEY")]),
        "routes[0].api_key_env",
        "'EMPTY_KEY' is not set or is empty",
    ),
    ("key-env-empty-name", _doc(routes=[_route(api_key_env="")]), "routes[0].api_key_env", "must not be empty"),
    (
        "mock-key-env-unset",
        _doc(routes=[_route(endpoint="mock://", api_key_env="MY_UNSET_KEY")]),
        "routes[0].api_key_env",
        "'MY_UNSET_KEY' is not set",
    ),
    (
        "mock-key-both",
        _doc(routes=[_route(endpoint="mock://", api_key="k")]),
        "routes[0]",
        "both api_key and api_key_env",
    ),
    (
        "provider-unknown",
        _doc(routes=[_route(provider_type="azure")]),
        "routes[0].provider_type",
        "unknown provider type 'azure' (known: anthropic, deepinfra, nvidia, openai)",
    ),
    ("provider-number", _doc(routes=[_route(provider_type=1)]), "routes[0].provider_type", "expected a string"),
    ("connect-zero", _doc(routes=[_route(connect_timeout=0)]), "routes[0].connect_timeout", "positive number"),
    ("first-byte-negative", _doc(routes=[_route(first_byte_timeout=-1.5)]), "routes[0].first_byte_timeout", "positive"),
    ("idle-bool", _doc(routes=[_route(idle_timeout=True)]), "routes[0].idle_timeout", "expected a number, got a boolean"),
    ("idle-string", _doc(routes=[_route(idle_timeout="10")]), "routes[0].idle_timeout", "expected a number, got a string"),
    ("idle-inf", _doc(routes=[_route(idle_timeout=float("inf"))]), "routes[0].idle_timeout", "positive number"),
    ("idle-nan", _doc(routes=[_route(idle_timeout=float("nan"))]), "routes[0].idle_timeout", "positive number"),
    ("limits-list", _doc(limits=[1]), "limits", "expected a mapping, got a list"),
    ("limits-unknown", _doc(limits={"max_body": 1}), "limits.max_body", "unknown key (allowed: max_head_bytes"),
    ("limits-zero", _doc(limits={"max_headers": 0}), "limits.max_headers", "integer >= 1"),
    ("limits-float", _doc(limits={"max_body_bytes": 1.5}), "limits.max_body_bytes", "expected an integer, got a number"),
    ("limits-bool", _doc(limits={"max_connections": True}), "limits.max_connections", "expected an integer, got a boolean"),
    ("limits-string", _doc(limits={"max_head_bytes": "16k"}), "limits.max_head_bytes", "expected an integer"),
    ("timeouts-list", _doc(timeouts=["x"]), "timeouts", "expected a mapping, got a list"),
    ("timeouts-unknown", _doc(timeouts={"connnect": 1}), "timeouts.connnect", "unknown key (allowed: head_read"),
    ("timeouts-zero", _doc(timeouts={"head_read": 0}), "timeouts.head_read", "positive number"),
    ("timeouts-bool", _doc(timeouts={"tls_handshake": False}), "timeouts.tls_handshake", "got a boolean"),
    ("timeouts-string", _doc(timeouts={"write_stall": "60s"}), "timeouts.write_stall", "expected a number"),
    ("policy-list", _doc(policy=["pypi.org:443"]), "policy", "expected a mapping, got a list"),
    ("policy-unknown", _doc(policy={"deny": []}), "policy.deny", "unknown key (allowed: allow, intercept)"),
    ("policy-allow-string", _doc(policy={"allow": "pypi.org:443"}), "policy.allow", "expected a list, got a string"),
    ("policy-entry-number", _doc(policy={"allow": ["pypi.org:443", 443]}), "policy.allow[1]", "expected a string"),
    ("policy-entry-bad", _doc(policy={"allow": ["pypi.org:443", "*.com:443"]}), "policy.allow[1]", "too broad"),
    ("listen-empty", _doc(listen=""), "listen", "must not be empty"),
    ("listen-number", _doc(listen=3128), "listen", "expected a string, got an integer"),
    ("ca-dir-empty", _doc(ca_dir=" "), "ca_dir", "must not be empty"),
    ("ca-dir-list", _doc(ca_dir=["/x"]), "ca_dir", "expected a string, got a list"),
] + [
    (f"endpoint-bad-{i}", _doc(routes=[_route(endpoint=endpoint)]), "routes[0].endpoint", "must be http://host")
    for i, endpoint in enumerate(
        [
            "ftp://example.com/v1",
            "integrate.api.nvidia.com/v1",
            "https://",
            "https:///v1",
            "http://:8080/v1",
            "http://host:notaport/v1",
            "http://host:99999/v1",
            "http://host:0/v1",
            "http://[::1/v1",
            "https://user:pw@host/v1",
            "https://host/v1?x=1",
            "https://host/v1#frag",
            "https://host /v1",
            "https://host/v1\n",
            "mock:",
        ]
    )
]


@pytest.mark.parametrize(
    ("document", "path", "message"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_errors_name_the_key_path(document: object, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(document, ENV | {"EMPTY_KEY": ""})
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    assert message in text
    assert "\n" not in text
    assert SECRET not in text


def test_empty_endpoint_is_reported_as_empty() -> None:
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.endpoint: must not be empty$"):
        parse_config(_doc(routes=[_route(endpoint="")]), ENV)


SECRET_LEAK_CASES = {
    "key-not-a-string": _route(api_key_env=None, api_key=12345678901234567890),
    "key-with-newline": _route(api_key_env=None, api_key=SECRET + "\r\nX-Evil: 1"),
    "key-with-space": _route(api_key_env=None, api_key=SECRET + " "),
    "both-keys": _route(api_key=SECRET),
    "literal-key-bad-protocol": _route(api_key_env=None, api_key=SECRET, protocols=["nope"]),
    "literal-key-bad-provider": _route(api_key_env=None, api_key=SECRET, provider_type="nope"),
    "env-key-bad-timeout": _route(idle_timeout=0),
    "credentials-in-endpoint": _route(endpoint=f"https://user:{SECRET}@host/v1"),
    "secret-in-endpoint-query": _route(endpoint=f"https://host/v1?key={SECRET}"),
    "secret-in-endpoint-path-with-space": _route(endpoint=f"https://host/{SECRET} "),
}


@pytest.mark.parametrize("route", SECRET_LEAK_CASES.values(), ids=SECRET_LEAK_CASES.keys())
def test_secrets_never_in_error_messages(route: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(routes=[route]), ENV)
    assert SECRET not in str(info.value)
    assert "12345678901234567890" not in str(info.value)


def test_secret_never_in_error_message_from_file(tmp_path: Any) -> None:
    path = _write(tmp_path, f"routes:\n  - name: x\n    api_key: {SECRET}\n    endpoint: nope\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert SECRET not in str(info.value)
    assert str(info.value).startswith(f"config {path}: routes[0].endpoint: ")


def test_secrets_never_in_repr() -> None:
    doc = _doc(routes=[_route(), _route(name="other", api_key_env=None, api_key="literal-" + SECRET)])
    config = parse_config(doc, ENV)
    assert config.routes[0].api_key == SECRET
    assert config.routes[1].api_key == "literal-" + SECRET
    for text in (repr(config), str(config), repr(config.routes[0]), str(config.routes[1])):
        assert SECRET not in text
    assert "inference.local" in repr(config)


def test_api_key_env_resolved_from_given_environ_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAVTWIST_TEST_KEY", "from-os-environ")
    doc = _doc(routes=[_route(api_key_env="NAVTWIST_TEST_KEY")])
    with pytest.raises(ConfigError, match="NAVTWIST_TEST_KEY"):
        parse_config(doc, {})
    assert parse_config(doc, {"NAVTWIST_TEST_KEY": "from-argument"}).routes[0].api_key == "from-argument"


def test_literal_api_key_is_used_as_is() -> None:
    config = parse_config(_doc(routes=[_route(api_key_env=None, api_key="sk-literal")]), {})
    assert config.routes[0].api_key == "sk-literal"


def test_mock_route_key_is_optional_but_resolved_when_given() -> None:
    doc = _doc(routes=[_route(endpoint="mock://", api_key_env="MOCK_KEY", provider_type=None)])
    assert parse_config(doc, {"MOCK_KEY": "mk"}).routes[0].api_key == "mk"
    doc = _doc(routes=[_route(endpoint="mock://", api_key_env=None, provider_type=None)])
    assert parse_config(doc, {}).routes[0].api_key == ""


@pytest.mark.parametrize(
    ("environ", "endpoint", "model", "protocols", "api_key", "provider_type"),
    [
        (
            {"NVIDIA_API_KEY": "nv", "OPENAI_API_KEY": "oa"},
            "https://integrate.api.nvidia.com/v1",
            "meta/llama-3.1-8b-instruct",
            ("openai_chat_completions", "openai_completions", "model_discovery"),
            "nv",
            "nvidia",
        ),
        (
            {"NVIDIA_API_KEY": "", "OPENAI_API_KEY": "oa"},
            "https://api.openai.com/v1",
            "gpt-4o-mini",
            (
                "openai_chat_completions",
                "openai_completions",
                "openai_responses",
                "openai_embeddings",
                "model_discovery",
            ),
            "oa",
            "openai",
        ),
        ({"OPENAI_API_KEY": ""}, "mock://", "navtwist-mock", PROTOCOLS, "", None),
        ({}, "mock://", "navtwist-mock", PROTOCOLS, "", None),
    ],
    ids=["nim-wins", "openai", "mock-empty-vars", "mock"],
)
def test_default_config_picks_nim_then_openai_then_mock(
    environ: dict[str, str],
    endpoint: str,
    model: str,
    protocols: tuple[str, ...],
    api_key: str,
    provider_type: str | None,
) -> None:
    config = default_config(environ)
    assert config.routes == (
        Route(
            name="inference.local",
            endpoint=endpoint,
            model=model,
            protocols=protocols,
            api_key=api_key,
            provider_type=provider_type,
        ),
    )
    assert config.routes[0].is_mock == (endpoint == "mock://")
    assert config.listen == "tcp:3128:interface=127.0.0.1"
    assert config.ca_dir == os.path.expanduser("~/.navtwist/ca")
    assert (config.limits, config.timeouts) == (Limits(), Timeouts())


def test_load_config_without_path_is_default_config() -> None:
    environ = {"OPENAI_API_KEY": "oa"}
    assert load_config(None, environ) == default_config(environ)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Any) -> None:
    path = _write(tmp_path, "routes:\n  - name: a\n    model: [unclosed\n    endpoint: mock://\n\nx: }\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    text = str(info.value)
    assert text.startswith(f"config {path}: line ")
    assert "invalid YAML" in text
    assert "\n" not in text


def test_yaml_syntax_error_line_number(tmp_path: Any) -> None:
    path = _write(tmp_path, "listen: a\nca_dir: b\nroutes: : :\n")
    with pytest.raises(ConfigError, match=r": line 3: invalid YAML: "):
        load_config(path, {})


def test_yaml_bad_character_names_line(tmp_path: Any) -> None:
    path = _write(tmp_path, "listen: a\n\nca_dir: \x07\n")
    with pytest.raises(ConfigError, match=r": line 3: invalid YAML: "):
        load_config(path, {})


def test_unreadable_file(tmp_path: Any) -> None:
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=rf"^config {missing}: cannot read: No such file or directory$"):
        load_config(missing, {})
    with pytest.raises(ConfigError, match=r"cannot read: "):
        load_config(str(tmp_path), {})


def test_non_utf8_file(tmp_path: Any) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"listen: caf\xe9\n")
    with pytest.raises(ConfigError, match="cannot read: not valid UTF-8"):
        load_config(str(path), {})


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_file(tmp_path: Any, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^config {path}: file is empty$"):
        load_config(path, {})


def test_file_validation_errors_name_file_and_key_path(tmp_path: Any) -> None:
    path = _write(tmp_path, OPENSHELL_ROUTES + "limits:\n  max_headers: 0\n")
    with pytest.raises(ConfigError, match=rf"^config {path}: limits\.max_headers: must be an integer >= 1$"):
        load_config(path, ENV)


def test_with_overrides() -> None:
    config = parse_config(_doc(listen="tcp:1", ca_dir="/etc/ca"), ENV)
    assert with_overrides(config, None, None) == config
    changed = with_overrides(config, r"tcp6:9999:interface=\:\:1", "~/my-ca")
    assert changed.listen == r"tcp6:9999:interface=\:\:1"
    assert changed.ca_dir == os.path.expanduser("~/my-ca")
    assert not changed.ca_dir.startswith("~")
    assert changed.routes == config.routes
    assert (config.listen, config.ca_dir) == ("tcp:1", "/etc/ca")
    assert with_overrides(config, None, "/x").listen == "tcp:1"
    with pytest.raises(ConfigError, match="^listen: must not be empty$"):
        with_overrides(config, "", None)


def test_ca_dir_from_file_is_expanded() -> None:
    assert parse_config(_doc(ca_dir="~/ca"), ENV).ca_dir == os.path.expanduser("~/ca")


def test_config_is_frozen() -> None:
    config = default_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen = "tcp:1"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].api_key = "x"  # type: ignore[misc]


def test_tools_that_never_call_upstreams_can_read_configs_without_keys() -> None:
    document = {"routes": [{"name": "r", "endpoint": "https://x/v1", "model": "m",
                            "protocols": ["openai_chat_completions"], "api_key_env": "UNSET_KEY"}]}
    with pytest.raises(ConfigError, match="UNSET_KEY"):
        parse_config(document, {})
    assert parse_config(document, {}, require_keys=False).routes[0].api_key == ""


def test_the_shipped_example_config_loads_as_documented() -> None:
    """README and docs/service.md start navtwist with navtwist.example.yaml: it must load."""
    root = Path(__file__).resolve().parent.parent
    config = load_config(str(root / "navtwist.example.yaml"), {})
    assert config.listen == "tcp:3128:interface=127.0.0.1" and config.routes[0].is_mock
    assert [entry.host for entry in config.policy.intercept] == ["api.github.com", "github.com"]
    readme = (root / "README.md").read_text()
    assert "--config navtwist.example.yaml" in readme and "--pidfile=" in readme
