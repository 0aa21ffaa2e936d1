"""The environment a sandbox sets so its tools go through navtwist and trust its CA.

Tools disagree on variable names (curl reads lower-case proxy variables,
requests reads C{REQUESTS_CA_BUNDLE}, git C{GIT_SSL_CAINFO}, ...), so each
setting is given under every common name.  Most of these CA variables
I{replace} the tool's trust store, so they point at a bundle holding the
system's CAs plus navtwist's; only Node adds its file to its own store.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shlex
import ssl
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple
from urllib.parse import urlsplit

from navtwist.ca import CertificateAuthority, load_for
from navtwist.intercept.credentials import CredentialSet, load_or_create_seed
from navtwist.config import Config

BUNDLE_NAME = "bundle.pem"
NO_PROXY = "localhost,127.0.0.1,::1"
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy")
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")
BUNDLE_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")
CA_VARIABLES = ("NODE_EXTRA_CA_CERTS",)
# Node's built-in fetch (which the Node SDKs use) ignores the proxy variables unless
# this is set; Node 24 and 22.21 honour it, older Node ignores it (README: "Node").
NODE_PROXY_VARIABLES = ("NODE_USE_ENV_PROXY",)
# Tried after Python's own idea of the system store and certifi.
COMMON_SYSTEM_STORES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")

# Twisted's positional parameter order and default interface for each
# endpoint type a proxy URL can be derived from.
_TCP_ENDPOINTS = {
    "tcp": (("port", "interface", "backlog"), ""),
    "tcp6": (("port", "backlog", "interface"), "::"),
}
# A wildcard listener is reached on the loopback address of its own family.
_WILDCARD_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
# shlex.quote's set of characters that need no quoting.
_UNQUOTED = re.compile(r"[\w@%+=:,./-]+", re.ASCII)


class EnvError(Exception):
    """One line telling the user what to fix."""


class ProxyURL(NamedTuple):
    url: str
    note: str | None  # set when the URL's host is not the listen interface itself


class SandboxEnv(NamedTuple):
    variables: dict[str, str]
    notes: list[str]  # for the user, not for the sandbox


def prepare(config: Config, proxy_url: str | None, system_stores: Iterable[str] | None = None) -> SandboxEnv:
    """The variables for a sandbox of the proxy C{config} describes.

    Creates the CA if missing, so this works before the proxy first starts,
    and (re)writes the bundle next to it.  C{proxy_url} (None: derive it from
    C{config.listen}) is how the sandbox reaches the proxy, which from inside
    a network namespace may not be the listen address.  C{system_stores} (None:
    L{system_store_candidates}) are the files tried for the system's CAs.

    @raise EnvError: for an unusable or underivable proxy URL, or an unwritable bundle.
    @raise CAError: when the CA cannot be loaded or created.
    """
    notes: list[str] = []
    if proxy_url is None:
        url, note = proxy_url_from_listen(config.listen)
        if note:
            notes.append(note)
    else:
        url = check_proxy_url(proxy_url)
    ca = load_for(config)
    ca_path = Path(os.path.abspath(ca.cert_path))
    bundle_path, bundle_notes = refresh_bundle(ca, system_stores)
    notes.extend(bundle_notes)
    variables = sandbox_variables(url, bundle_path, ca_path)
    placeholders: dict[str, str] = {}
    if config.credentials:
        seed = load_or_create_seed(Path(config.ca_dir))
        placeholders = CredentialSet.create(config.credentials, seed).env_variables()
    clash = sorted(set(placeholders) & set(variables))
    if clash:
        raise EnvError(f"credentials: sandbox_env {clash[0]} is one of the proxy variables navtwist env prints")
    return SandboxEnv({**variables, **placeholders}, notes)


def refresh_bundle(ca: CertificateAuthority, system_stores: Iterable[str] | None = None) -> tuple[Path, list[str]]:
    """(Re)write the bundle next to C{ca}'s certificate; returns its path and notes for the user.

    C{system_stores} (None: L{system_store_candidates}) are the files tried
    for the system's CAs.

    @raise EnvError: when the bundle cannot be written.
    """
    bundle_path = Path(os.path.abspath(ca.cert_path)).with_name(BUNDLE_NAME)
    stores = system_store_candidates() if system_stores is None else system_stores
    system = read_system_store(stores, exclude=bundle_path)
    notes: list[str] = []
    if system is None:
        notes.append(
            f"warning: no system CA store found; {bundle_path} holds only navtwist's CA, "
            "so tools using it will not trust other HTTPS servers"
        )
    write_bundle(bundle_path, system, ca.certificate_pem())
    return bundle_path, notes


def sandbox_variables(proxy_url: str, bundle: Path, ca: Path) -> dict[str, str]:
    """Every variable, in a fixed order so the output is diffable."""
    groups = (
        (PROXY_VARIABLES, proxy_url),
        (NO_PROXY_VARIABLES, NO_PROXY),
        (BUNDLE_VARIABLES, str(bundle)),
        (CA_VARIABLES, str(ca)),
        (NODE_PROXY_VARIABLES, "1"),
    )
    return {name: value for names, value in groups for name in names}


def proxy_url_from_listen(listen: str) -> ProxyURL:
    """The URL a client on this host uses for a proxy listening on the endpoint string C{listen}.

    @raise EnvError: for endpoints a URL cannot be derived from (unix:,
        ssl:, port 0, an interface that is not an IP address, ...).
    """
    args, kwargs = _parse_endpoint(listen)
    kind = args[0] if args else ""
    if kind not in _TCP_ENDPOINTS:
        raise _underivable(listen, "not a tcp: or tcp6: endpoint")
    names, default_interface = _TCP_ENDPOINTS[kind]
    params = {**dict(zip(names, args[1:])), **kwargs}
    port = params.get("port", "")
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise _underivable(listen, f"port {port!r} is not a fixed TCP port")
    interface = params.get("interface", default_interface)
    host = _WILDCARD_LOOPBACK.get(interface, interface)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise _underivable(listen, f"interface {interface!r} is not an IP address") from None
    # RFC 6874: an IPv6 zone's "%" is written "%25" in a URL.
    netloc = f"[{str(address).replace('%', '%25')}]" if address.version == 6 else str(address)
    url = f"http://{netloc}:{port}"
    if host == interface:
        return ProxyURL(url, None)
    return ProxyURL(url, f"listen {listen!r} accepts connections on all interfaces; using {url} "
                         "(pass --proxy-url if the sandbox reaches the proxy at another address)")


def check_proxy_url(url: str) -> str:
    """C{url} if clients can use it as a proxy URL, so a typo fails here rather than in every tool.

    @raise EnvError: otherwise; the message does not repeat the URL, which may hold a password.
    """
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port or IPv6 literal
        usable = False
    # Not printable covers control characters and all whitespace but " ".
    if not usable or " " in url or not url.isprintable():
        raise EnvError("--proxy-url must be http://host[:port] or https://host[:port]")
    return url


def system_store_candidates() -> list[str]:
    """Files that may hold the system's trusted CAs, best first."""
    paths = ssl.get_default_verify_paths()
    candidates = [paths.cafile, paths.openssl_cafile]
    with contextlib.suppress(ImportError):
        import certifi

        candidates.append(certifi.where())
    return [*filter(None, candidates), *COMMON_SYSTEM_STORES]


def read_system_store(candidates: Iterable[str], exclude: Path) -> bytes | None:
    """The first candidate holding PEM certificates, other than C{exclude}.

    The bundle itself is excluded: where C{SSL_CERT_FILE} already points at
    it, Python reports it as the system store, and the bundle would grow by
    one CA on every run.
    """
    excluded = os.path.realpath(exclude)
    for candidate in candidates:
        if os.path.realpath(candidate) == excluded:
            continue
        try:
            data = Path(candidate).read_bytes()
        except OSError:
            continue
        if _PEM_CERTIFICATE in data:
            return data
    return None


def write_bundle(path: Path, system: bytes | None, ca_pem: bytes) -> None:
    """Make C{path} hold C{system} followed by C{ca_pem}.

    An unchanged bundle is left alone, so running this for every sandbox
    start does not disturb tools watching the file.  A rewrite is atomic, so
    a sandbox starting meanwhile never sees half a bundle.

    @raise EnvError: when it cannot be written.
    """
    content = (system.rstrip() + b"\n" if system else b"") + ca_pem
    with contextlib.suppress(OSError):
        if path.read_bytes() == content:
            return
    try:
        _replace(path, content, 0o644)
    except OSError as e:
        raise EnvError(f"cannot write {path}: {e.strerror}") from None


def render(variables: Mapping[str, str], fmt: str) -> str:
    """C{variables} as text in the format C{fmt}, one of L{FORMATS}."""
    return FORMATS[fmt](variables)


def _sh(variables: Mapping[str, str]) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in variables.items())


def _dotenv(variables: Mapping[str, str]) -> str:
    return "".join(f"{name}={_dotenv_quote(value)}\n" for name, value in variables.items())


def _json(variables: Mapping[str, str]) -> str:
    return json.dumps(dict(variables), indent=2) + "\n"


FORMATS: dict[str, Callable[[Mapping[str, str]], str]] = {"sh": _sh, "json": _json, "dotenv": _dotenv}


def _dotenv_quote(value: str) -> str:
    """Bare when safe, else double-quoted with the backslash escapes that
    python-dotenv and docker compose decode.  (C{$} is left alone: dotenv
    dialects disagree on escaping it.)"""
    if _UNQUOTED.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _parse_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """Positional and keyword parameters of a Twisted endpoint string, as
    Twisted splits them: on C{:}, C{key=value} at the first C{=}, C{\\} escaping."""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    segment = [""]  # the text so far, or [key, value so far] after an "="

    def end_segment() -> None:
        if len(segment) == 1:
            args.append(segment[0])
        else:
            kwargs[segment[0]] = segment[1]

    chars = iter(description)
    for char in chars:
        if char == "\\":
            segment[-1] += next(chars, "")
        elif char == ":":
            end_segment()
            segment = [""]
        elif char == "=" and len(segment) == 1:
            segment.append("")
        else:
            segment[-1] += char
    end_segment()
    return args, kwargs


def _underivable(listen: str, why: str) -> EnvError:
    return EnvError(f"cannot derive a proxy URL from listen {listen!r}: {why}; pass --proxy-url")


def _replace(path: Path, content: bytes, mode: int) -> None:
    """Write C{content} to a temporary file beside C{path}, then rename it over C{path}."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as f:
            os.fchmod(fd, mode)  # mkstemp creates 0600
            f.write(content)
            f.flush()
            os.fsync(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
