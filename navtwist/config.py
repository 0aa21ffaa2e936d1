"""navtwist's YAML configuration, validated completely at start-up.

A proxy that holds API keys should refuse to start on a doubtful config rather
than fail on the first request, so every key is checked here and every error
names the key path it is about.  Error messages never carry a secret.

The format is a superset of NVIDIA OpenShell's standalone C{routes.yaml}: a
file holding only C{routes:} is a complete config.
"""
from __future__ import annotations

import base64
import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Mapping, TypeVar
from urllib.parse import urlsplit

import yaml

from navtwist.inference import hooks
from navtwist.listen_address import parse_listen, same_address
from navtwist.egress.policy import Policy
from navtwist.intercept.credentials import Credential, CredentialError, check_bound, parse_credentials
from navtwist.secret import SecretMissing, checked, read_or_keep
from navtwist.intercept.rules import InterceptEntry, check_overlap, parse_intercept
from navtwist.inference.protocols import (
    MODEL_DISCOVERY,
    OPENAI_CHAT_COMPLETIONS,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    PROTOCOLS,
)
from navtwist.inference.providers import get_provider, providers

_T = TypeVar("_T")


class ConfigError(ValueError):
    """One line, naming the offending key path, e.g.
    C{"routes[0].protocols[1]: unknown protocol 'foo' (known: ...)"}.

    Never contains a secret value.
    """


@dataclass(frozen=True)
class Route:
    """Where requests for some protocols are sent, and with which key."""

    name: str
    endpoint: str
    model: str
    protocols: tuple[str, ...]
    api_key: str = field(repr=False)  # resolved; "" only for mock:// routes
    provider_type: str | None
    connect_timeout: float = 10.0
    first_byte_timeout: float = 300.0  # long prefills are normal
    idle_timeout: float = 300.0  # between body chunks
    total_timeout: float = 600.0  # non-streaming calls only
    models: tuple[str, ...] = ()  # client-facing names; empty: the protocol's default route
    passthrough_model: bool = False  # forward the client's model instead of C{model}
    fallback: tuple[str, ...] = ()  # names of routes tried next, after those sharing this name
    fallback_on: tuple[int, ...] = (429, 500, 502, 503, 504)
    heartbeat: float | None = None  # seconds between SSE comments while waiting for a stream
    max_concurrent: int | None = None  # beyond it: the next candidate, else 429
    # Where api_key came from, not what the route is: the variable read (None:
    # literal or no key), and on a reload why the previous key was kept.
    api_key_env: str | None = field(default=None, compare=False)
    key_kept_because: str | None = field(default=None, compare=False)

    @property
    def is_mock(self) -> bool:
        """mock:// routes are answered by navtwist itself, without an upstream."""
        return _scheme(self.endpoint) == "mock"


@dataclass(frozen=True)
class Limits:
    """Size and count caps, so one client cannot exhaust the proxy's memory."""

    max_head_bytes: int = 16384
    max_headers: int = 100
    max_body_bytes: int = 32 * 1024 * 1024
    max_connections: int = 10000
    # Upstream answers (inference routes and forwarded http:// requests).
    max_response_head_bytes: int = 65536
    max_response_headers: int = 200
    max_decoded_bytes: int = 256 * 1024 * 1024
    max_decompression_ratio: int = 100
    socket_buffer_bytes: int = 262144


@dataclass(frozen=True)
class Timeouts:
    """Proxy-wide timeouts in seconds, so stalled clients do not hold connections."""

    head_read: float = 30.0
    tls_handshake: float = 10.0
    keepalive_idle: float = 60.0
    write_stall: float = 60.0
    # Tunnels and forwarded http:// requests (inference routes have their own).
    connect: float = 10.0
    upstream_idle: float = 300.0


@dataclass(frozen=True)
class UpstreamProxy:
    """The parent proxy every upstream connection goes through (C{CONNECT}), as in corporate networks."""

    host: str
    port: int
    tls: bool = False  # https://: TLS to the parent, verified for C{host} against the system trust store
    authorization: bytes | None = field(default=None, repr=False)  # the Proxy-Authorization value

    def __str__(self) -> str:
        """The parent as an operator wrote it, without credentials (safe to log)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration; C{ca_dir} is always stored with C{~} expanded."""

    listen: str = "tcp:3128:interface=127.0.0.1"
    ca_dir: str = "~/.navtwist/ca"
    routes: tuple[Route, ...]
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    policy: Policy[InterceptEntry] = field(default_factory=Policy)
    plugins: tuple[str, ...] = ()  # request hooks and stream observers to enable, by name
    drain_timeout: float = 30.0  # on SIGTERM, how long in-flight work may take to finish
    admin_listen: str | None = None  # endpoint of /healthz, /readyz, /metrics; off when absent
    ca_name_constraints: bool = True  # limit the CA to inference.local and the intercepted hosts
    audit_log: str | None = None  # path of the OCSF decision log; off when absent
    credentials: tuple[Credential, ...] = ()  # secrets swapped for placeholders on intercepted hosts
    upstream_proxy: UpstreamProxy | None = None  # the parent proxy for navtwist's own connections; none when absent

    def __post_init__(self) -> None:
        # Expanding here, the one place every Config passes through, keeps
        # the default, parsed and overridden values alike.
        object.__setattr__(self, "ca_dir", os.path.expanduser(self.ca_dir))


_ROUTE_TIMEOUTS = ("connect_timeout", "first_byte_timeout", "idle_timeout", "total_timeout")
_ROUTE_KEYS = (
    "name", "endpoint", "model", "protocols", "api_key", "api_key_env", "provider_type",
    "models", "passthrough_model", "fallback", "fallback_on", "heartbeat", "max_concurrent",
) + _ROUTE_TIMEOUTS
_TOP_KEYS = (
    "listen", "ca_dir", "routes", "limits", "timeouts", "policy", "plugins", "drain_timeout", "admin_listen",
    "ca_name_constraints", "audit_log", "credentials", "upstream_proxy",
)
_UPSTREAM_PROXY_KEYS = ("url", "auth_env", "auth_file")


def parse_config(
    data: object, environ: Mapping[str, str], require_keys: bool = True, previous: Config | None = None
) -> Config:
    """Validate already-loaded YAML C{data}; C{environ} resolves C{api_key_env}
    and credentials' C{env:}.

    With C{require_keys} false, an unset key variable leaves the key empty:
    for tools that read the config but never call an upstream.  With
    C{previous} (a reload), a credential whose secret cannot be read now
    keeps its previous secret (see L{parse_credentials}), and so does a
    route's C{api_key_env} (see L{_api_key}).

    @raise ConfigError: for the first problem found.
    """
    top = _mapping(data, "", _TOP_KEYS)
    defaults = _defaults(Config)
    routes = _list(top, "routes", "")
    policy = _policy(top)
    return _check_listeners(Config(
        listen=_endpoint(top, "listen", "", defaults["listen"]),
        ca_dir=_string(top, "ca_dir", "", defaults["ca_dir"]),
        routes=_check_fallbacks(
            tuple(
                _route(entry, f"routes[{i}]", environ, require_keys, previous.routes if previous is not None else ())
                for i, entry in enumerate(routes)
            )
        ),
        limits=_section(top, "limits", Limits, _integer),
        timeouts=_section(top, "timeouts", Timeouts, _number),
        policy=policy,
        credentials=_credentials(top, environ, policy, previous),
        plugins=_plugins(top),
        drain_timeout=_number(top, "drain_timeout", "", defaults["drain_timeout"]),
        admin_listen=_endpoint(top, "admin_listen", "", None),
        ca_name_constraints=_bool(top, "ca_name_constraints", "", defaults["ca_name_constraints"]),
        audit_log=_string(top, "audit_log", "", None),
        upstream_proxy=_upstream_proxy(top, environ),
    ))


def load_config(
    path: str | None, environ: Mapping[str, str], require_keys: bool = True, previous: Config | None = None
) -> Config:
    """Read and validate the YAML file at C{path}; no path means L{default_config}.

    @raise ConfigError: naming C{path}, for unreadable, malformed or invalid files.
    """
    if path is None:
        return default_config(environ)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: cannot read: not valid UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: {_describe_yaml_error(exc, text)}") from None
    if data is None:
        raise ConfigError(f"config {path}: file is empty")
    try:
        return parse_config(data, environ, require_keys, previous)
    except ConfigError as exc:
        raise ConfigError(f"config {path}: {exc}") from None


def default_config(environ: Mapping[str, str]) -> Config:
    """The config used without a file, so C{twistd -n navtwist} works out of the box.

    Routes to NVIDIA NIM if C{NVIDIA_API_KEY} is set, else to OpenAI if
    C{OPENAI_API_KEY} is set, else to the built-in mock.  It is written as a
    user would write it, so it goes through the same validation.
    """
    if environ.get("NVIDIA_API_KEY"):
        route: dict[str, object] = {
            "endpoint": "https://integrate.api.nvidia.com/v1",
            "model": "meta/llama-3.1-8b-instruct",
            "protocols": [OPENAI_CHAT_COMPLETIONS, OPENAI_COMPLETIONS, MODEL_DISCOVERY],
            "api_key_env": "NVIDIA_API_KEY",
            "provider_type": "nvidia",
        }
    elif environ.get("OPENAI_API_KEY"):
        route = {
            "endpoint": "https://api.openai.com/v1",
            "model": "gpt-4o-mini",
            "protocols": [
                OPENAI_CHAT_COMPLETIONS,
                OPENAI_COMPLETIONS,
                OPENAI_RESPONSES,
                OPENAI_EMBEDDINGS,
                MODEL_DISCOVERY,
            ],
            "api_key_env": "OPENAI_API_KEY",
            "provider_type": "openai",
        }
    else:
        route = {"endpoint": "mock://", "model": "navtwist-mock", "protocols": list(PROTOCOLS)}
    return parse_config({"routes": [{"name": "inference.local", **route}]}, environ)


def with_overrides(config: Config, listen: str | None, ca_dir: str | None) -> Config:
    """C{config} with command-line values (None: keep) for C{listen} and C{ca_dir}."""
    given = {"listen": listen, "ca_dir": ca_dir}
    return _check_listeners(replace(
        config,
        listen=_endpoint(given, "listen", "", config.listen),
        ca_dir=_string(given, "ca_dir", "", config.ca_dir),
    ))


def _route(
    data: object, path: str, environ: Mapping[str, str], require_keys: bool, previous: tuple[Route, ...]
) -> Route:
    route = _mapping(data, path, _ROUTE_KEYS)
    name = _required_string(route, "name", path)
    endpoint = _required_string(route, "endpoint", path)
    if not _is_usable_url(endpoint):
        # The value is not echoed: a URL can carry credentials.
        raise ConfigError(f"{_join(path, 'endpoint')}: must be http://host[:port][/path], https://host[:port][/path] or mock://")
    defaults = _defaults(Route)
    passthrough = _bool(route, "passthrough_model", path, False)
    model = _string(route, "model", path, "") if passthrough else _required_string(route, "model", path)
    protocols = _protocols(route, path)
    api_key, api_key_env, kept_because = _api_key(
        route, path, environ, _scheme(endpoint) == "mock", require_keys, [r for r in previous if r.name == name])
    return Route(
        name=name,
        endpoint=endpoint,
        model=model,
        protocols=protocols,
        api_key=api_key,
        provider_type=_provider_type(route, path),
        models=_models(route, path),
        passthrough_model=passthrough,
        fallback=_string_list(route, "fallback", path),
        fallback_on=_status_list(route, "fallback_on", path, defaults["fallback_on"]),
        heartbeat=_number(route, "heartbeat", path, None),
        max_concurrent=_integer(route, "max_concurrent", path, None),
        api_key_env=api_key_env,
        key_kept_because=kept_because,
        **{key: _number(route, key, path, defaults[key]) for key in _ROUTE_TIMEOUTS},
    )


def _check_fallbacks(routes: tuple[Route, ...]) -> tuple[Route, ...]:
    """Every name in a C{fallback:} list must be the name of some route."""
    names = {route.name for route in routes}
    for i, route in enumerate(routes):
        for j, name in enumerate(route.fallback):
            if name not in names:
                raise ConfigError(f"routes[{i}].fallback[{j}]: no route is named {name!r}")
    return routes


def _is_usable_url(endpoint: str) -> bool:
    """Only URLs the upstream client can use unchanged: no credentials, query or fragment."""
    if _has_space_or_control(endpoint) or not endpoint.lower().startswith(("http://", "https://", "mock://")):
        return False
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:  # a bad port or IPv6 literal
        return False
    if parts.scheme == "mock":
        return True
    return bool(parts.hostname) and port != 0 and parts.username is None and not parts.query and not parts.fragment


def _protocols(route: Mapping[Any, object], path: str) -> tuple[str, ...]:
    where = _join(path, "protocols")
    protocols: list[str] = []
    for i, value in enumerate(_list(route, "protocols", path)):
        item = f"{where}[{i}]"
        if not isinstance(value, str):
            raise _type_error(item, "a string", value)
        if value not in PROTOCOLS:
            raise ConfigError(f"{item}: unknown protocol {value!r} (known: {', '.join(PROTOCOLS)})")
        if value in protocols:
            raise ConfigError(f"{item}: duplicate protocol {value!r}")
        protocols.append(value)
    return tuple(protocols)


def _api_key(
    route: Mapping[Any, object], path: str, environ: Mapping[str, str], mock: bool, require: bool,
    same_name: list[Route],
) -> tuple[str, str | None, str | None]:
    """Resolve the route's key now, so a missing variable stops start-up: the
    key, the variable it was read from, and the warning when it was kept.

    The same path as the credentials' secrets (navtwist/secret.py): the same
    characters allowed, and on a reload (C{same_name}: the routes in use with
    this name) a variable that became unset, empty or unusable keeps the key
    a route of this name read from it, with a warning, instead of failing
    the whole reload.
    """
    key = _string(route, "api_key", path, None)
    env = _string(route, "api_key_env", path, None)
    if key is not None and env is not None:
        raise ConfigError(f"{path}: both api_key and api_key_env are set; use one")
    try:
        if env is not None:
            where = _join(path, "api_key_env")
            in_use = next((r.api_key for r in same_name if r.api_key_env == env and r.api_key), None)
            try:
                secret, kept_because = read_or_keep("env", env, environ, where, in_use)
            except SecretMissing:
                if not require:
                    return "", env, None
                raise ConfigError(f"{where}: environment variable {env!r} is not set or is empty") from None
            return secret, env, kept_because
        if key is not None:
            return checked(key, f"{_join(path, 'api_key')}: the key"), None, None
    except CredentialError as exc:
        raise ConfigError(str(exc)) from None
    if mock:
        return "", None, None
    raise ConfigError(f"{path}: neither api_key nor api_key_env is set")


def _provider_type(route: Mapping[Any, object], path: str) -> str | None:
    name = _string(route, "provider_type", path, None)
    if name is not None:
        try:
            get_provider(name)
        except KeyError:
            known = ", ".join(sorted(providers()))
            raise ConfigError(f"{_join(path, 'provider_type')}: unknown provider type {name!r} (known: {known})") from None
    return name


def _section(top: Mapping[Any, object], key: str, cls: type[_T], read: Callable[..., Any]) -> _T:
    """A mapping of optional values whose keys and defaults are the fields of C{cls}."""
    defaults = _defaults(cls)
    section = _optional_mapping(top, key, defaults)
    return cls(**{name: read(section, name, key, default) for name, default in defaults.items()})


def _policy(top: Mapping[Any, object]) -> Policy[InterceptEntry]:
    """The egress allow-list; absent or empty, nothing is allowed."""
    where = "policy.allow"
    section = _optional_mapping(top, "policy", ("allow", "intercept"))
    entries = section.get("allow")
    if entries is None:
        return _with_intercept(Policy(), section)
    if not isinstance(entries, list):
        raise _type_error(where, "a list", entries)
    try:
        policy: Policy[InterceptEntry] = Policy.parse(entries, where)
    except ValueError as exc:  # already names the entry, e.g. policy.allow[2]
        raise ConfigError(str(exc)) from None
    return _with_intercept(policy, section)


def _credentials(
    top: Mapping[Any, object], environ: Mapping[str, str], policy: Policy[InterceptEntry], previous: Config | None
) -> tuple[Credential, ...]:
    """The C{credentials:} section, each bound only to intercepted (never tunnelled) hosts."""
    try:
        credentials = parse_credentials(
            top.get("credentials"), environ, previous=previous.credentials if previous is not None else ())
        intercepted = [(entry.pattern, entry.port) for entry in policy.intercept if not entry.inference]
        check_bound(credentials, intercepted)
    except CredentialError as exc:
        raise ConfigError(str(exc)) from None
    return credentials


def _with_intercept(policy: Policy[InterceptEntry], section: Mapping[Any, object]) -> Policy[InterceptEntry]:
    """C{policy} with the hosts navtwist intercepts, none of which it may
    also tunnel; absent or empty, nothing is intercepted."""
    where = "policy.intercept"
    entries = section.get("intercept")
    if entries is None:
        return policy
    if not isinstance(entries, list):
        raise _type_error(where, "a list", entries)
    try:
        intercept = parse_intercept(entries, where)
        check_overlap(intercept, policy.rules, where)
    except ValueError as exc:  # already names the key path
        raise ConfigError(str(exc)) from None
    return replace(policy, intercept=intercept)


def _upstream_proxy(top: Mapping[Any, object], environ: Mapping[str, str]) -> UpstreamProxy | None:
    """C{upstream_proxy}: a URL, or a mapping with C{url} and the credentials'
    source (C{auth_env} or C{auth_file}, holding C{user:password}, sent as Basic)."""
    value = top.get("upstream_proxy")
    if value is None:
        return None
    if isinstance(value, str):
        section: Mapping[Any, object] = {"url": value}
        where = "upstream_proxy"
    else:
        section = _mapping(value, "upstream_proxy", _UPSTREAM_PROXY_KEYS)
        where = "upstream_proxy.url"
    url = _string(section, "url", "upstream_proxy", None)
    if url is None:
        raise ConfigError(f"{where}: required key is missing")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        port, parts = None, None
    if parts is not None and parts.username is not None:
        # The value is not echoed: it carries a secret.
        raise ConfigError(f"{where}: credentials in the URL are not accepted; use upstream_proxy.auth_env or auth_file")
    if (parts is None or _has_space_or_control(url) or parts.scheme not in ("http", "https") or not parts.hostname
            or port is None or port == 0 or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ConfigError(f"{where}: must be http://host:port or https://host:port")
    return UpstreamProxy(parts.hostname, port, parts.scheme == "https", _proxy_authorization(section, environ))


def _proxy_authorization(section: Mapping[Any, object], environ: Mapping[str, str]) -> bytes | None:
    """The C{Proxy-Authorization} value from C{auth_env} or C{auth_file}, read now so a missing one stops start-up."""
    env = _string(section, "auth_env", "upstream_proxy", None)
    path = _string(section, "auth_file", "upstream_proxy", None)
    if env is not None and path is not None:
        raise ConfigError("upstream_proxy: both auth_env and auth_file are set; use one")
    if env is not None:
        where = "upstream_proxy.auth_env"
        secret = environ.get(env, "")
        if not secret:
            raise ConfigError(f"{where}: environment variable {env!r} is not set or is empty")
    elif path is not None:
        where = "upstream_proxy.auth_file"
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                secret = f.read().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: {path} is not valid UTF-8") from None
    else:
        return None
    if ":" not in secret or _has_space_or_control(secret):
        raise ConfigError(f"{where}: expected user:password without whitespace or control characters")
    return b"Basic " + base64.b64encode(secret.encode("utf-8"))


def _plugins(top: Mapping[Any, object]) -> tuple[str, ...]:
    """Enabled plugin names, each one installed: a typo must stop start-up."""
    names = _string_list(top, "plugins", "")
    known = hooks.available()
    for i, name in enumerate(names):
        if name not in known:
            offered = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"plugins[{i}]: no plugin named {name!r} is installed (installed: {offered})")
    return names


# Typed accessors.  A key that is present but null counts as absent, so
# "limits:" with nothing under it means "all defaults".


def _mapping(value: object, where: str, allowed: Iterable[str]) -> Mapping[Any, object]:
    allowed = tuple(allowed)
    if not isinstance(value, dict):
        raise _type_error(where or "top level", "a mapping", value)
    for key in value:
        if key not in allowed:
            raise ConfigError(f"{_join(where, str(key))}: unknown key (allowed: {', '.join(allowed)})")
    return value


def _optional_mapping(top: Mapping[Any, object], key: str, allowed: Iterable[str]) -> Mapping[Any, object]:
    """The section C{top[key]}; absent, it is empty."""
    value = top.get(key)
    return _mapping({} if value is None else value, key, allowed)


def _list(mapping: Mapping[Any, object], key: str, path: str) -> list[object]:
    """A required, non-empty list."""
    where = _join(path, key)
    value = mapping.get(key)
    if value is None:
        raise ConfigError(f"{where}: required key is missing")
    if not isinstance(value, list):
        raise _type_error(where, "a list", value)
    if not value:
        raise ConfigError(f"{where}: must not be empty")
    return value


def _string(mapping: Mapping[Any, object], key: str, path: str, default: _T) -> str | _T:
    """A non-blank string, or C{default} when absent."""
    where = _join(path, key)
    value = mapping.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _type_error(where, "a string", value)
    if not value.strip():
        raise ConfigError(f"{where}: must not be empty")
    return value


def _required_string(mapping: Mapping[Any, object], key: str, path: str) -> str:
    value = _string(mapping, key, path, None)
    if value is None:
        raise ConfigError(f"{_join(path, key)}: required key is missing")
    return value


def _bool(mapping: Mapping[Any, object], key: str, path: str, default: bool) -> bool:
    value = mapping.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(_join(path, key), "true or false", value)
    return value


def _string_list(mapping: Mapping[Any, object], key: str, path: str) -> tuple[str, ...]:
    """An optional list of distinct non-blank strings; absent or [], empty."""
    if mapping.get(key) is None:
        return ()
    where = _join(path, key)
    items = mapping[key]
    if not isinstance(items, list):
        raise _type_error(where, "a list", items)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _type_error(f"{where}[{i}]", "a string", item)
        if not item.strip():
            raise ConfigError(f"{where}[{i}]: must not be empty")
        if item in items[:i]:
            raise ConfigError(f"{where}[{i}]: duplicate {item!r}")
    return tuple(items)


def _status_list(mapping: Mapping[Any, object], key: str, path: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """HTTP status codes; an explicit empty list means none."""
    value = mapping.get(key)
    if value is None:
        return default
    where = _join(path, key)
    if not isinstance(value, list):
        raise _type_error(where, "a list", value)
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599:
            raise ConfigError(f"{where}[{i}]: expected an HTTP status code (100-599)")
    return tuple(value)


def _number(mapping: Mapping[Any, object], key: str, path: str, default: _T) -> float | _T:
    """A positive, finite number of seconds; ints are accepted, bools are not."""
    where = _join(path, key)
    value = mapping.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(where, "a number", value)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{where}: must be a positive number")
    return float(value)


def _integer(mapping: Mapping[Any, object], key: str, path: str, default: _T) -> int | _T:
    where = _join(path, key)
    value = mapping.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(where, "an integer", value)
    if value < 1:
        raise ConfigError(f"{where}: must be an integer >= 1")
    return value


_KINDS = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def _type_error(where: str, expected: str, value: object) -> ConfigError:
    """Names only the type of C{value}: the value itself may be a secret."""
    got = _KINDS.get(type(value), type(value).__name__)
    return ConfigError(f"{where}: expected {expected}, got {got}")


def _describe_yaml_error(exc: yaml.YAMLError, text: str) -> str:
    """One line with the line number; PyYAML's own message spans several lines."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        line = mark.line + 1
        problem = getattr(exc, "problem", None) or "syntax error"
    else:  # a ReaderError (bad character) has only a position
        line = text.count("\n", 0, getattr(exc, "position", 0)) + 1
        problem = getattr(exc, "reason", None) or "syntax error"
    return f"line {line}: invalid YAML: {' '.join(str(problem).split())}"


def _defaults(cls: type) -> dict[str, Any]:
    """The dataclass's own plain defaults, so each default is written only once."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _scheme(url: str) -> str:
    return urlsplit(url).scheme


def _has_space_or_control(text: str) -> bool:
    return any(c.isspace() or not c.isprintable() for c in text)


def _endpoint(mapping: Mapping[Any, object], key: str, path: str, default: _T) -> str | _T:
    """A Twisted server endpoint string, checked now: a typo must stop start-up, not the listener."""
    value = _string(mapping, key, path, default)
    if isinstance(value, str):
        try:
            parse_listen(value)
        except ValueError as exc:
            raise ConfigError(f"{_join(path, key)}: {exc}") from None
    return value


def _check_listeners(config: Config) -> Config:
    """The admin endpoint needs an address of its own."""
    if config.admin_listen is not None and same_address(parse_listen(config.listen), parse_listen(config.admin_listen)):
        raise ConfigError(
            f"admin_listen: {config.admin_listen!r} is the same address as listen ({config.listen!r}); "
            "give the admin endpoint its own port, e.g. tcp:9128:interface=127.0.0.1"
        )
    return config


def _models(route: Mapping[Any, object], path: str) -> tuple[str, ...]:
    """A route's client-facing model names.  An explicit [] is refused: it could
    mean "answers no model" as well as "absent" (the protocols' default route)."""
    if route.get("models") == []:
        raise ConfigError(
            f"{_join(path, 'models')}: must not be empty: leave the key out to make the route its protocols' "
            "default, or list the model names it answers to"
        )
    return _string_list(route, "models", path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an
    error: by default the last one silently wins (a second C{routes:} would
    replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" entries may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first_line[key] + 1})", key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)
