"""Tests for navtwist.secret: the one path of every injected secret, inference route keys and credentials alike."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from navtwist.config import ConfigError, parse_config
from navtwist.inference.providers import get_provider
from navtwist.intercept.credentials import Binding, Credential, CredentialSet, Rewrite, parse_credentials
from navtwist.secret import CredentialError, SecretMissing, read_or_keep, read_secret, wire_bytes
from navtwist.service.reload import ConfigReloader
from navtwist.service.server_tap import make_service

KEY = "nvapi-Route0Key1With2Enough3Characters"
SEED = bytes(range(32))


# --- reading -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "message"),
    [({}, "r: secret from env K is not set"), ({"K": ""}, "r: secret from env K is empty"), ({"K": " \n"}, "r: secret from env K is empty")],
)
def test_an_unset_or_empty_secret_is_missing(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SecretMissing) as info:
        read_secret("env", "K", environ, "r")
    assert str(info.value) == message


@pytest.mark.parametrize("value", ["a b", "ab\r\nX-Evil: 1", "tökensecret"])
def test_an_unsafe_secret_is_an_error_but_not_missing(value: str) -> None:
    with pytest.raises(CredentialError) as info:
        read_secret("env", "K", {"K": value}, "r")
    assert not isinstance(info.value, SecretMissing)  # a tool that may go on without a key must not go on with this
    assert str(info.value) == "r: secret from env K contains whitespace, control or non-ASCII characters"


def test_a_file_secret_loses_its_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    assert read_secret("file", str(path), {}, "r") == KEY


def test_read_or_keep_reads_when_it_can() -> None:
    assert read_or_keep("env", "K", {"K": "new"}, "r", previous="old") == ("new", None)


def test_read_or_keep_keeps_the_value_in_use_with_a_warning() -> None:
    assert read_or_keep("env", "K", {"K": ""}, "r", previous="old") == (
        "old", "r: secret from env K is empty; keeping the previous value")


def test_read_or_keep_raises_without_a_value_in_use() -> None:
    with pytest.raises(SecretMissing, match="^r: secret from env K is not set$"):
        read_or_keep("env", "K", {}, "r", previous=None)


# --- injection: one wire form for route keys and credentials ------------------------------


def test_wire_bytes_are_the_ascii_secret() -> None:
    assert wire_bytes(KEY) == KEY.encode("ascii")


@pytest.mark.parametrize("secret", ["", "ab cd", "ab\r\nX-Evil: 1", "ab\tcd", "tökensecret"])
def test_wire_bytes_refuse_what_a_header_cannot_carry(secret: str) -> None:
    with pytest.raises(CredentialError) as info:
        wire_bytes(secret)
    assert str(info.value) == "refusing to inject a secret that is empty or holds whitespace, control or non-ASCII characters"


@pytest.mark.parametrize(("provider", "header", "scheme"), [("openai", b"authorization", b"Bearer "), ("anthropic", b"x-api-key", b"")])
def test_provider_auth_header_is_scheme_and_wire_bytes(provider: str, header: bytes, scheme: bytes) -> None:
    assert get_provider(provider).auth_headers(KEY) == [(header, scheme + wire_bytes(KEY))]


def test_provider_refuses_to_inject_a_key_that_would_forge_a_header() -> None:
    # A route made without the config (a test's, a plugin's) still cannot smuggle CR/LF upstream.
    with pytest.raises(CredentialError):
        get_provider("openai").auth_headers(KEY + "\r\nX-Evil: 1")


def test_credential_set_refuses_to_inject_a_secret_that_would_forge_a_header() -> None:
    unsafe = Credential("github", "env", "T", "GITHUB_TOKEN", (Binding("api.github.com", 443),), secret="a\r\nX-Evil: 1")
    with pytest.raises(CredentialError):
        CredentialSet.create([unsafe], SEED)


def test_a_route_key_and_a_credential_inject_the_same_bytes() -> None:
    """The route sets Bearer <key>; a credential replaces Bearer <placeholder>: the same header results."""
    (credential,) = parse_credentials({"api": {"env": "K", "sandbox_env": "T", "hosts": ["api.openai.com"]}}, {"K": KEY})
    credentials = CredentialSet.create([credential], SEED)
    placeholder = credentials.env_variables()["T"].encode()
    rewritten = credentials.rewrite("api.openai.com", 443, b"/v1/models", [(b"authorization", b"Bearer " + placeholder)])
    assert isinstance(rewritten, Rewrite)
    assert rewritten.headers == get_provider("openai").auth_headers(KEY)


# --- inference routes: read and kept like credentials --------------------------------------


def _doc(**route: Any) -> dict[str, Any]:
    entry = {"name": "r", "endpoint": "https://api.example/v1", "model": "m", "protocols": ["openai_chat_completions"],
             "api_key_env": "ROUTE_KEY"}
    entry.update(route)
    return {"routes": [{k: v for k, v in entry.items() if v is not None}]}


@pytest.mark.parametrize("now", [{}, {"ROUTE_KEY": ""}, {"ROUTE_KEY": "bad key"}])
def test_reload_keeps_a_route_key_whose_variable_became_unusable(now: dict[str, str]) -> None:
    old = parse_config(_doc(), {"ROUTE_KEY": KEY})
    new = parse_config(_doc(), now, previous=old)
    (route,) = new.routes
    assert route.api_key == KEY
    assert route.key_kept_because is not None
    assert route.key_kept_because.startswith("routes[0].api_key_env: secret from env ROUTE_KEY ")
    assert route.key_kept_because.endswith("; keeping the previous value")
    assert route == old.routes[0]  # the same route: it keeps its concurrency gate
    # Once the variable is good again, the next reload reads it and stops warning.
    newer = parse_config(_doc(), {"ROUTE_KEY": "rotated-key"}, previous=new)
    assert (newer.routes[0].api_key, newer.routes[0].key_kept_because) == ("rotated-key", None)


def test_reload_does_not_keep_a_key_read_from_another_variable() -> None:
    old = parse_config(_doc(), {"ROUTE_KEY": KEY})
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.api_key_env: environment variable 'OTHER' is not set or is empty$"):
        parse_config(_doc(api_key_env="OTHER"), {}, previous=old)


def test_reload_does_not_give_a_key_to_another_route() -> None:
    old = parse_config(_doc(), {"ROUTE_KEY": KEY})
    with pytest.raises(ConfigError, match="'ROUTE_KEY' is not set or is empty"):
        parse_config(_doc(name="renamed"), {}, previous=old)


def test_reload_does_not_keep_a_literal_key() -> None:
    """A literal is the config's own text: a bad new one is a bad config."""
    old = parse_config(_doc(api_key_env=None, api_key=KEY), {})
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.api_key: the key contains whitespace"):
        parse_config(_doc(api_key_env=None, api_key=KEY + " x"), {}, previous=old)


def test_route_key_rules_are_the_credentials_rules() -> None:
    # Surrounding whitespace of a variable goes (a Secret's final newline), as for credentials' env:.
    assert parse_config(_doc(), {"ROUTE_KEY": f" {KEY}\n"}).routes[0].api_key == KEY
    # Non-ASCII cannot be sent as header bytes: refused at start, as for credentials.
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.api_key: the key contains whitespace, control or non-ASCII"):
        parse_config(_doc(api_key_env=None, api_key="clé-secrète"), {})
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.api_key_env: secret from env ROUTE_KEY contains whitespace"):
        parse_config(_doc(), {"ROUTE_KEY": "clé"})


def test_tools_go_on_without_a_missing_key_but_not_with_an_unsafe_one() -> None:
    assert parse_config(_doc(), {}, require_keys=False).routes[0].api_key == ""
    with pytest.raises(ConfigError, match="contains whitespace"):
        parse_config(_doc(), {"ROUTE_KEY": "a\r\nb"}, require_keys=False)


def test_service_reload_logs_the_kept_route_key_without_the_key(tmp_path: Path) -> None:
    old = parse_config({**_doc(), "ca_dir": str(tmp_path / "ca")}, {"ROUTE_KEY": KEY})
    top = make_service(old, MemoryReactorClock(), reload=lambda current: parse_config(
        {**_doc(), "ca_dir": str(tmp_path / "ca")}, {}, previous=current))
    [reloader] = [s for s in top if isinstance(s, ConfigReloader)]
    with capturedLogs() as events:
        assert reloader.reload()
    assert reloader.current.routes[0].api_key == KEY
    lines = [formatEvent(event) for event in events]
    assert "routes[0].api_key_env: secret from env ROUTE_KEY is not set; keeping the previous value" in lines
    assert not any(KEY in line or KEY in repr(event) for line, event in zip(lines, events))
