"""Endpoint-bound credentials: the sandbox holds a placeholder, navtwist injects the secret.

A prompt-injected agent can read anything in its sandbox, so real tokens stay
with navtwist.  The sandbox gets a placeholder (from C{navtwist env}); in an
intercepted request to an endpoint the credential is bound to, every
placeholder in a header value (also inside C{Basic} base64), a path segment
or a query value is replaced by the secret.  A placeholder headed anywhere
else refuses the whole request (fail closed), and bodies are never rewritten.

Placeholders are derived with HMAC-SHA256 from a per-instance seed
(C{placeholder.key} in the CA directory) and the credential's name and
I{shape}: a secret with a known format (C{ghp_…}, C{sk-ant-api03-…},
C{xoxb-…}, …) gets a placeholder with the same prefix, length, separators and
character classes, because SDKs validate token formats.  The shape, not the
value, goes into the derivation, so rotating to a secret of the same shape
keeps the placeholder.

No secret appears in a C{repr}, an exception or a warning; the credential's
name stands for it.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import math
import os
import re
import secrets
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Collection, Iterator, Mapping, Sequence
from urllib.parse import quote_from_bytes, unquote_to_bytes

from navtwist.egress.policy import InterceptTarget, Policy, normalize_host
# Reading, the reload rule and the wire form are shared with the inference
# routes' keys (navtwist/secret.py).
from navtwist.secret import CredentialError, read_or_keep, wire_bytes

SEED_NAME = "placeholder.key"
SEED_BYTES = 32
KEYS = ("env", "file", "sandbox_env", "hosts")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a log field and a metrics label
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PORT = re.compile(r"[0-9]{1,5}")
# Path-prefix characters: printable ASCII without space and without what
# would make the comparison ambiguous (query, fragment, escapes, backslash).
_PREFIX_CHARS = re.compile(r"[!-~]*")
_PREFIX_FORBIDDEN = frozenset("?#%\\")
_BASIC = re.compile(rb"(basic +)([A-Za-z0-9+/]+={0,2}) *", re.IGNORECASE)

# Placeholder alphabets, each with a name that goes into the derivation.
DIGITS = "0123456789"
HEX = "0123456789abcdef"
UPPER_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ALNUM = ALPHA + DIGITS
_ALPHABET_NAMES = {DIGITS: "digits", HEX: "hex", UPPER_ALNUM: "upper-alnum", ALPHA: "alpha", ALNUM: "alnum"}
MIN_PLACEHOLDER_BITS = 64  # below this a shaped placeholder could be guessed or occur by chance
GENERIC_RANDOM_CHARS = 32


# --- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """An endpoint a credential may be sent to: C{host} normalized, C{prefix}
    a path without its trailing slash (None: any path)."""

    host: str
    port: int
    prefix: bytes | None = None

    def __str__(self) -> str:
        return f"{_bracketed(self.host)}:{self.port}{(self.prefix or b'').decode('ascii')}"

    def covers(self, host: str, port: int, path: bytes | None) -> bool:
        """Whether a request to C{host} (normalized), C{port} and the
        canonical C{path} (L{canonical_path}; None: ambiguous) may carry it."""
        if host != self.host or port != self.port:
            return False
        if self.prefix is None:
            return True
        return path is not None and (path == self.prefix or path.startswith(self.prefix + b"/"))


@dataclass(frozen=True)
class Credential:
    """One entry of C{credentials:}, with its secret resolved.

    C{kept_because} is set when the secret could not be re-read on a reload
    and the previous value was kept: the warning line to log.
    """

    name: str
    source: str  # "env" or "file"
    location: str  # the variable name or the file path
    sandbox_env: str
    hosts: tuple[Binding, ...]
    secret: str = field(repr=False)
    kept_because: str | None = None


def parse_credentials(
    raw: object,
    environ: Mapping[str, str],
    path: str = "credentials",
    *,
    previous: Sequence[Credential] = (),
) -> tuple[Credential, ...]:
    """Validate the C{credentials:} mapping and read every secret.

    A secret that is empty or unreadable is an error, unless C{previous}
    (the credentials in use, on a reload) holds the same name with the same
    source: then its secret is kept and C{kept_because} says why.

    @raise CredentialError: for the first problem, naming its key path.
    """
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise CredentialError(f"{path}: expected a mapping of names to credentials, got {_kind(raw)}")
    old = {c.name: c for c in previous}
    credentials: list[Credential] = []
    seen_env: dict[str, str] = {}
    for name, entry in raw.items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise CredentialError(
                f"{where}: a credential name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        credential = _credential(name, entry, where, environ, old.get(name))
        other = seen_env.setdefault(credential.sandbox_env, name)
        if other != name:
            raise CredentialError(
                f"{where}.sandbox_env: {credential.sandbox_env} is already the sandbox_env of {path}.{other}"
            )
        credentials.append(credential)
    return tuple(credentials)


def _credential(
    name: str, entry: object, where: str, environ: Mapping[str, str], old: Credential | None
) -> Credential:
    if not isinstance(entry, dict):
        raise CredentialError(f"{where}: expected a mapping, got {_kind(entry)}")
    for key in entry:
        if key not in KEYS:
            raise CredentialError(f"{where}.{key}: unknown key (allowed: {', '.join(KEYS)})")
    sources = [key for key in ("env", "file") if entry.get(key) is not None]
    if len(sources) != 1:
        raise CredentialError(f"{where}: set exactly one of env and file (where the secret is read)")
    source = sources[0]
    location = _text(entry, source, where)
    if source == "file":
        location = os.path.expanduser(location)
    sandbox_env = _text(entry, "sandbox_env", where)
    if not _SHELL_NAME.fullmatch(sandbox_env):
        raise CredentialError(f"{where}.sandbox_env: {sandbox_env!r} is not a valid shell variable name")
    hosts = entry.get("hosts")
    if not isinstance(hosts, list) or not hosts:
        raise CredentialError(f"{where}.hosts: expected a non-empty list of 'host:port[/path-prefix]'")
    bindings: list[Binding] = []
    for i, item in enumerate(hosts):
        binding = parse_binding(item, f"{where}.hosts[{i}]")
        if binding in bindings:
            raise CredentialError(f"{where}.hosts[{i}]: duplicate {binding}")
        bindings.append(binding)
    unread = Credential(name, source, location, sandbox_env, tuple(bindings), secret="")
    return _with_secret(unread, environ, where, old)


def _with_secret(
    credential: Credential, environ: Mapping[str, str], where: str, old: Credential | None
) -> Credential:
    """C{credential} with its secret read now; if that fails and C{old} reads
    from the same place, C{old}'s secret, with the reason in C{kept_because}."""
    same_place = old is not None and (old.source, old.location) == (credential.source, credential.location)
    in_use = old.secret if old is not None and same_place else None  # the secret in use, from this same place
    secret, kept_because = read_or_keep(credential.source, credential.location, environ, where, in_use)
    return replace(credential, secret=secret, kept_because=kept_because)


def parse_binding(item: object, where: str) -> Binding:
    """C{"host[:port][/path-prefix]"}, port 443 by default; an IPv6 address in brackets.

    @raise CredentialError: naming C{where}.
    """
    if not isinstance(item, str):
        raise CredentialError(f"{where}: expected a string like 'api.github.com:443', got {_kind(item)}")
    if item.startswith("["):
        end = item.find("]")
        if end < 0:
            raise CredentialError(f"{where}: {item!r}: unterminated '[' in the IPv6 address")
        host_text, rest = item[: end + 1], item[end + 1 :]
        port_text, slash, prefix_text = rest.partition("/")
        if port_text and not port_text.startswith(":"):
            raise CredentialError(f"{where}: {item!r}: expected ':port' or '/path' after the address")
        port_text = port_text[1:]
        if port_text == "" and rest.startswith(":"):
            raise CredentialError(f"{where}: {item!r}: empty port")
    else:
        authority, slash, prefix_text = item.partition("/")
        host_text, colon, port_text = authority.partition(":")
        if ":" in port_text:
            raise CredentialError(f"{where}: {item!r}: write an IPv6 address in brackets, as in '[::1]:443'")
        if colon and not port_text:
            raise CredentialError(f"{where}: {item!r}: empty port")
    if "*" in host_text:
        raise CredentialError(f"{where}: {item!r}: a credential is bound to exact hosts, not wildcards")
    try:
        host = normalize_host(host_text)
    except ValueError as exc:
        raise CredentialError(f"{where}: {exc}") from None
    port = 443
    if port_text:
        if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise CredentialError(f"{where}: {item!r}: port must be a number from 1 to 65535")
        port = int(port_text)
    prefix = _prefix(slash + prefix_text, item, where) if slash else None
    return Binding(host, port, prefix)


def _prefix(text: str, item: str, where: str) -> bytes | None:
    """The path prefix without its trailing slash; C{"/"} alone means any path."""
    if not _PREFIX_CHARS.fullmatch(text) or _PREFIX_FORBIDDEN & set(text):
        raise CredentialError(
            f"{where}: {item!r}: the path prefix must be printable ASCII without spaces, '?', '#', '%' or '\\'"
        )
    segments = text[1:].removesuffix("/").split("/")
    if any(segment in ("", ".", "..") for segment in segments) and text != "/":
        raise CredentialError(f"{where}: {item!r}: the path prefix has an empty, '.' or '..' segment")
    stripped = text.rstrip("/")
    return stripped.encode("ascii") if stripped else None


def check_bound(
    credentials: Sequence[Credential], intercept_endpoints: Collection[tuple[str, int]], path: str = "credentials"
) -> None:
    """Every bound host must be intercepted: through an opaque tunnel the
    placeholder would leave verbatim and the secret never be injected.

    C{intercept_endpoints} are C{(host, port)} as in an intercept entry: an
    exact name, C{"*.suffix"} or an IP literal.

    @raise CredentialError: naming the first binding that no entry covers.
    """
    intercepted: Policy[InterceptTarget] = Policy.parse([f"{_bracketed(host)}:{port}" for host, port in intercept_endpoints])
    for credential in credentials:
        for i, binding in enumerate(credential.hosts):
            if not intercepted.allows(binding.host, binding.port):
                raise CredentialError(
                    f"{path}.{credential.name}.hosts[{i}]: {binding.host}:{binding.port} is not an intercept entry "
                    "(policy.intercept); a tunnel is opaque: the placeholder would leave verbatim"
                )


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def load_or_create_seed(ca_dir: Path) -> bytes:
    """The instance's placeholder seed, C{ca_dir/placeholder.key} (32 bytes, 0600).

    Created once, atomically (a concurrent creator's file wins and is read),
    so placeholders survive restarts, secret rotations and CA re-issues.

    @raise CredentialError: when it cannot be read or created, or is not 32 bytes.
    """
    path = Path(ca_dir) / SEED_NAME
    try:
        return _read_seed(path)
    except FileNotFoundError:
        pass
    temporary = path.with_name(f".{SEED_NAME}.{secrets.token_hex(8)}.tmp")
    try:
        os.makedirs(path.parent, mode=0o700, exist_ok=True)
        fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with open(fd, "wb") as f:
            f.write(secrets.token_bytes(SEED_BYTES))
            f.flush()
            os.fsync(fd)
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)  # never replaces: the first creator wins
        return _read_seed(path)
    except OSError as exc:
        raise CredentialError(f"cannot create {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _read_seed(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) != SEED_BYTES:
        raise CredentialError(
            f"{path} must hold exactly {SEED_BYTES} bytes; remove it to create a new one (every placeholder changes)"
        )
    return data


# --- placeholders --------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """A known token format: C{prefix} then a body matching C{body}.

    Characters in C{separators} keep their positions; each run between them
    gets C{alphabet}, or, when None, the smallest of digits, lower-case hex
    and alphanumeric holding the run (for formats mixing numeric ids and
    random parts, like Slack's).  Alphabets are never wider than the format's:
    a base64url body gets an alphanumeric placeholder, which it also accepts.
    """

    prefix: re.Pattern[str]
    body: re.Pattern[str]
    separators: str = ""
    alphabet: str | None = ALNUM


def _shape(prefix: str, body: str, separators: str = "", alphabet: str | None = ALNUM) -> _Shape:
    return _Shape(re.compile(prefix), re.compile(body), separators, alphabet)


_B64URL = r"[A-Za-z0-9_-]+"
# Tried in order: more specific prefixes first.
SHAPES = (
    _shape(r"github_pat_", r"[A-Za-z0-9]+_[A-Za-z0-9]+", "_"),  # github_pat_<22>_<59>
    _shape(r"gh[pousr]_", r"[A-Za-z0-9]+"),
    _shape(r"sk-ant-[a-z]+[0-9]{2}-", _B64URL),  # sk-ant-api03-, sk-ant-admin01-, sk-ant-oat01-
    _shape(r"sk-(?:proj|svcacct|admin)-", _B64URL),
    _shape(r"(?:sk|rk)_(?:live|test)_", r"[A-Za-z0-9]+"),  # Stripe
    _shape(r"sk-", _B64URL, alphabet=None),  # OpenAI legacy (alnum), DeepSeek (hex), ...
    _shape(r"xox[abeprs]-", r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*", "-", None),  # Slack: ids, then random
    _shape(r"xapp-", r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*", "-", None),
    _shape(r"glpat-", r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*", ".", None),
    _shape(r"npm_", r"[A-Za-z0-9]+"),
    _shape(r"pypi-", _B64URL),
    _shape(r"hf_", r"[A-Za-z]+", alphabet=ALPHA),
    _shape(r"nvapi-", _B64URL),
    _shape(r"gsk_", r"[A-Za-z0-9]+"),
    _shape(r"xai-", r"[A-Za-z0-9]+"),
    _shape(r"AIza", _B64URL),  # Google API keys
    _shape(r"A(?:KIA|SIA)", r"[A-Z0-9]{16}", alphabet=UPPER_ALNUM),  # AWS access key ids
)

# A skeleton: the literal prefix, then separators (str) and runs (alphabet, length).
Skeleton = tuple[str, tuple["str | tuple[str, int]", ...]]


def skeleton(secret: str) -> Skeleton | None:
    """The shape of C{secret} if it has a known format with enough random
    characters to hide a placeholder in, else None (a generic placeholder)."""
    for shape in SHAPES:
        match = shape.prefix.match(secret)
        if match is None or not shape.body.fullmatch(secret[match.end():]):
            continue
        body = secret[match.end():]
        pieces = re.split(f"([{re.escape(shape.separators)}])", body) if shape.separators else [body]
        parts: list[str | tuple[str, int]] = []
        bits = 0.0
        for i, piece in enumerate(pieces):
            if i % 2:  # re.split with a group puts the separators at odd positions
                parts.append(piece)
                continue
            alphabet = shape.alphabet or _narrowest(piece)
            parts.append((alphabet, len(piece)))
            bits += len(piece) * math.log2(len(alphabet))
        if bits < MIN_PLACEHOLDER_BITS:
            return None
        return match.group(), tuple(parts)
    return None


def _narrowest(run: str) -> str:
    if all(c in DIGITS for c in run):
        return DIGITS
    if all(c in HEX for c in run):
        return HEX
    return ALNUM


def make_placeholder(seed: bytes, name: str, secret: str) -> str:
    """The placeholder for credential C{name}: shaped like C{secret} when its
    format is known, else C{navtwist-ph-<name>-<32 alphanumerics>}.

    Depends only on the seed, the name and the secret's skeleton, and is
    never the secret itself.
    """
    prefix, parts = skeleton(secret) or (f"navtwist-ph-{name}-", ((ALNUM, GENERIC_RANDOM_CHARS),))
    described = prefix + "|" + "|".join(p if isinstance(p, str) else f"{_ALPHABET_NAMES[p[0]]}:{p[1]}" for p in parts)
    attempt = 0
    while True:
        stream = _stream(seed, b"navtwist placeholder v1\0%s\0%s\0%d" % (name.encode(), described.encode(), attempt))
        placeholder = prefix + "".join(p if isinstance(p, str) else _draw(stream, *p) for p in parts)
        if placeholder != secret:
            return placeholder
        attempt += 1


def _stream(seed: bytes, label: bytes) -> Iterator[int]:
    """Bytes of HMAC-SHA256(seed, label || counter), counter 0, 1, ..."""
    counter = 0
    while True:
        yield from hmac.new(seed, label + counter.to_bytes(4, "big"), hashlib.sha256).digest()
        counter += 1


def _draw(stream: Iterator[int], alphabet: str, count: int) -> str:
    """C{count} characters of C{alphabet}, uniformly (rejection sampling, no modulo bias)."""
    limit = 256 - 256 % len(alphabet)
    out: list[str] = []
    while len(out) < count:
        byte = next(stream)
        if byte < limit:
            out.append(alphabet[byte % len(alphabet)])
    return "".join(out)


# --- injection -----------------------------------------------------------------------


@dataclass(frozen=True)
class Rewrite:
    """A request allowed to go on: its target and headers with secrets in
    place (the same objects when nothing was replaced), and the names of the
    credentials used, for the log."""

    target: bytes = field(repr=False)
    headers: list[tuple[bytes, bytes]] = field(repr=False)
    credentials: tuple[str, ...]


@dataclass(frozen=True)
class Mismatch:
    """A request that carries a placeholder where it may not go: answer
    C{403 {"error": "credential_endpoint_mismatch", "detail": detail}}."""

    credential: str
    detail: str


@dataclass(frozen=True)
class _Entry:
    name: str
    placeholder: bytes = field(repr=False)
    secret: bytes = field(repr=False)
    url_secret: bytes = field(repr=False)  # percent-encoded for a path or query
    bindings: tuple[Binding, ...]


_Substitute = Callable[[re.Match[bytes], bool], bytes]


class _Refused(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


class CredentialSet:
    """An immutable snapshot of the credentials in use; a reload builds a new one.

    Build it with L{create}; L{reload} and L{updated} return successors that
    keep every placeholder the sandbox already holds.
    """

    def __init__(self, credentials: Sequence[Credential], seed: bytes, placeholders: Mapping[str, str]) -> None:
        self.credentials = tuple(credentials)
        self._seed = seed
        self._placeholders = dict(placeholders)
        self._entries = tuple(
            _Entry(
                c.name,
                placeholders[c.name].encode("ascii"),
                wire_bytes(c.secret),
                quote_from_bytes(wire_bytes(c.secret), safe="").encode("ascii"),
                c.hosts,
            )
            for c in self.credentials
        )
        self._literal = _alternation([re.escape(e.placeholder) for e in self._entries])
        self._encoded = _alternation([_percent_tolerant(e.placeholder) for e in self._entries])

    def __repr__(self) -> str:
        return f"CredentialSet({[c.name for c in self.credentials]!r})"

    @classmethod
    def create(cls, credentials: Sequence[Credential], seed: bytes) -> CredentialSet:
        """The set at start: each placeholder derived from the seed and the secret's shape."""
        return cls(credentials, seed, {c.name: make_placeholder(seed, c.name, c.secret) for c in credentials})

    def updated(self, credentials: Sequence[Credential]) -> tuple[CredentialSet, list[str]]:
        """The successor for a reloaded config, and warning lines to log.

        A credential that keeps its name keeps its placeholder even if the
        secret's shape changed (the sandbox holds it; a restart derives the
        new shape's).
        """
        warnings = [c.kept_because for c in credentials if c.kept_because]
        placeholders = {}
        for c in credentials:
            derived = make_placeholder(self._seed, c.name, c.secret)
            placeholders[c.name] = self._placeholders.get(c.name, derived)
            if placeholders[c.name] != derived and not c.kept_because:
                warnings.append(
                    f"credentials.{c.name}: the new secret has another format; the sandbox's placeholder "
                    "stays until navtwist restarts, then `navtwist env` gives a new one"
                )
        return CredentialSet(credentials, self._seed, placeholders), warnings

    def reload(self, environ: Mapping[str, str]) -> tuple[CredentialSet, list[str]]:
        """Re-read every secret (SIGHUP, a changed C{file:}); one that is now
        empty or unreadable keeps its previous value, with a warning."""
        return self.updated([_with_secret(c, environ, f"credentials.{c.name}", c) for c in self.credentials])

    @property
    def files(self) -> tuple[str, ...]:
        """Secret files, to watch for rotation."""
        return tuple(c.location for c in self.credentials if c.source == "file")

    def env_variables(self) -> dict[str, str]:
        """C{sandbox_env} → placeholder, in config order, for C{navtwist env}."""
        return {c.sandbox_env: self._placeholders[c.name] for c in self.credentials}

    def rewrite(self, host: str, port: int, target: bytes, headers: list[tuple[bytes, bytes]]) -> Rewrite | Mismatch:
        """Put the secrets into an intercepted request to C{host}:C{port}.

        C{target} is the origin-form request target (path and query); a
        placeholder there may be percent-encoded.  Header values are searched
        as they are and, for C{Basic} credentials, base64-decoded.  Any
        placeholder bound elsewhere, or in a header name, refuses the whole
        request.
        """
        if self._literal is None or self._encoded is None:
            return Rewrite(target, headers, ())
        endpoint = _Endpoint(host, port, target)
        used: set[int] = set()

        def substitute(match: re.Match[bytes], url: bool) -> bytes:
            index = _index(match)
            entry = self._entries[index]
            if not endpoint.allows(entry):
                raise _Refused(index)
            used.add(index)
            return entry.url_secret if url else entry.secret

        try:
            new_target = target
            if b"%" in target or self._mentions(target):
                new_target = self._encoded.sub(lambda m: substitute(m, True), target)
            new_headers = headers
            if self._headers_may_hold(headers):
                new_headers = [self._header(name, value, substitute) for name, value in headers]
        except _Refused as refused:
            return self._mismatch(refused.index, endpoint)
        if not used:
            return Rewrite(target, headers, ())
        return Rewrite(new_target, new_headers, tuple(sorted(self._entries[i].name for i in used)))

    def _mentions(self, data: bytes) -> bool:
        """A quick literal test; a bytes search is far faster than a regex alternation."""
        return any(entry.placeholder in data for entry in self._entries)

    def _headers_may_hold(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """One search over all names and values joined, plus any Basic value
        decoded: the common request without a placeholder costs little."""
        if self._mentions(b"\n".join(part for header in headers for part in header)):
            return True
        return any(self._mentions(decoded) for _, value in headers for decoded in _basic_payloads(value))

    def _header(self, name: bytes, value: bytes, substitute: _Substitute) -> tuple[bytes, bytes]:
        assert self._literal is not None
        found = self._literal.search(name)
        if found is not None:
            raise _Refused(_index(found))
        value = self._literal.sub(lambda m: substitute(m, False), value)
        basic = _BASIC.fullmatch(value)
        if basic is not None:
            decoded = _b64decode(basic.group(2))
            if decoded is not None:
                replaced = self._literal.sub(lambda m: substitute(m, False), decoded)
                if replaced != decoded:
                    value = basic.group(1) + base64.b64encode(replaced)
        return name, value

    def _mismatch(self, index: int, endpoint: _Endpoint) -> Mismatch:
        entry = self._entries[index]
        where = endpoint.display
        if any(b.host == endpoint.host and b.port == endpoint.port for b in entry.bindings):
            where += " at this path"
        return Mismatch(entry.name, f"credential {entry.name} is not bound to {where}")

    def contains_placeholder(self, data: bytes) -> str | None:
        """The name of a credential whose placeholder is in C{data}, literally,
        percent-encoded or in a C{Basic} value: for plain C{http://}
        requests, which never carry one, whatever the host."""
        if self._literal is None or self._encoded is None:
            return None
        found = self._encoded.search(data)
        if found is None:
            for match in _BASIC.finditer(data):
                decoded = _b64decode(match.group(2))
                found = self._literal.search(decoded) if decoded is not None else None
                if found is not None:
                    break
        return None if found is None else self._entries[_index(found)].name

    def redact(self, data: bytes) -> bytes:
        """C{data} (a target to log) with every placeholder replaced by
        C{[credential:NAME]}: logs carry neither secrets nor placeholders."""
        if self._encoded is None:
            return data
        return self._encoded.sub(lambda m: b"[credential:%s]" % self._entries[_index(m)].name.encode(), data)


class _Endpoint:
    """The request's endpoint; host and path are put in canonical form only
    once a placeholder is found."""

    def __init__(self, host: str, port: int, target: bytes) -> None:
        self._given_host = host
        self.port = port
        self._target = target

    @cached_property
    def host(self) -> str:
        try:
            return normalize_host(self._given_host)
        except ValueError:
            return ""  # matches no binding: fail closed

    @cached_property
    def path(self) -> bytes | None:
        return canonical_path(self._target.partition(b"?")[0])

    @property
    def display(self) -> str:
        return f"{_bracketed(self.host or self._given_host)}:{self.port}"

    def allows(self, entry: _Entry) -> bool:
        return any(b.covers(self.host, self.port, self.path) for b in entry.bindings)


def canonical_path(path: bytes) -> bytes | None:
    """The percent-decoded path compared with binding prefixes, or None when
    origins could read it differently from a plain prefix test (encoded
    slashes or backslashes, dot segments, double encoding, ...)."""
    if not path.startswith(b"/") or b"\\" in path:
        return None
    lowered = path.lower()
    if b"%2f" in lowered or b"%5c" in lowered:
        return None
    decoded = unquote_to_bytes(path)
    if b"%" in decoded or b"\\" in decoded:
        return None
    for segment in decoded.split(b"/"):
        if segment.split(b";", 1)[0] in (b".", b".."):  # "..;" too (Tomcat)
            return None
    return decoded


def _alternation(patterns: Sequence[bytes]) -> re.Pattern[bytes] | None:
    """One pattern with a group per credential, so L{_index} names the one
    matched; None for no credentials (an empty pattern would match anything)."""
    return re.compile(b"|".join(b"(%s)" % p for p in patterns)) if patterns else None


def _index(match: re.Match[bytes]) -> int:
    """The credential an L{_alternation} match is about."""
    assert match.lastindex is not None
    return match.lastindex - 1


def _percent_tolerant(placeholder: bytes) -> bytes:
    """A pattern matching C{placeholder} with any characters percent-encoded (either hex case)."""
    parts = []
    for byte in placeholder:
        hex_digits = b"".join(b"[%c%c]" % (c, c + 32) if c >= ord("A") else bytes([c]) for c in b"%02X" % byte)
        parts.append(b"(?:%s|%%%s)" % (re.escape(bytes([byte])), hex_digits))
    return b"".join(parts)


def _basic_payloads(value: bytes) -> Iterator[bytes]:
    if value[:6].lower() != b"basic ":
        return
    match = _BASIC.fullmatch(value)
    if match is not None:
        decoded = _b64decode(match.group(2))
        if decoded is not None:
            yield decoded


def _b64decode(data: bytes) -> bytes | None:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def _text(entry: Mapping[object, object], key: str, where: str) -> str:
    value = entry.get(key)
    if value is None:
        raise CredentialError(f"{where}.{key}: required key is missing")
    if not isinstance(value, str):
        raise CredentialError(f"{where}.{key}: expected a string, got {_kind(value)}")
    if not value.strip() or "\0" in value:
        raise CredentialError(f"{where}.{key}: must be a non-empty string")
    return value


def _kind(value: object) -> str:
    """Only the type: the value may be a secret."""
    kinds = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a mapping"}
    return kinds.get(type(value), type(value).__name__)
