"""Per-request rules for intercepted hosts (C{policy.intercept}).

A host listed under C{policy.intercept} is not tunnelled: navtwist terminates
its TLS and L{decide}s every request by method, path and query before it may
reach the origin.  This module is pure logic: it parses and validates the
config entries, picks the entry for a host (L{navtwist.egress.policy.find_entry}) and judges one
request target (L{decide}); the network path calls it.

The rules are written for the path as the origin will act on it, so the
request target is normalised first and anything whose meaning could differ
between navtwist and the origin is refused outright, whatever the rules say:
C{.} and C{..} segments (also percent-encoded), an encoded C{/} (C{%2F}),
a C{\\} (raw or encoded), empty segments (C{//}, which some servers merge),
a raw C{;} in the path (path parameters, which some servers strip), control
characters after decoding (which some servers truncate at) and malformed
percent-encoding.  One trailing C{/} is ignored, on both sides.

Matching is narrow for allow rules and broad for deny rules, so that a
spelling the origin treats alike cannot slip past a deny rule: deny rules
compare method, path and query case-insensitively and match when any
occurrence of a query parameter matches; allow rules compare exactly and
need every occurrence to match.
"""
from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from navtwist.egress.policy import AllowRule, IPAddress, canonical_host, parse_ip

_T = TypeVar("_T")
Action = Literal["allow", "deny"]
Verdict = Literal["allow", "deny", "would_deny"]
# What decided, besides a rule index: the access preset, the default denial,
# a request target refused before any rule was consulted, or an inference
# entry (which this module does not serve).
Decider = int | Literal["preset", "default", "target", "inference"]

ACCESS_PRESETS: Mapping[str, frozenset[str] | None] = {
    "read-only": frozenset({"GET", "HEAD", "OPTIONS"}),
    "read-write": frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH"}),
    "full": None,  # any method
}
MODES = ("enforce", "audit")

_ENTRY_KEYS = ("host", "port", "access", "rules", "mode", "deny_reason", "upstream_ca", "inference")
_INFERENCE_KEYS = ("host", "port", "inference")
_RULE_KEYS = ("method", "path", "query")
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HEX = b"0123456789abcdefABCDEF"
_MAX_CA_BYTES = 4 * 1024 * 1024  # the system bundle is ~200 KiB


@dataclass(frozen=True)
class Rule:
    """One item of an entry's C{rules:}.

    C{methods} None means any method.  C{path} is the glob as configured;
    C{path_re} matches the normalised request path.  C{query} pairs each required parameter name with a
    pattern for its value.  C{index} is the rule's place in C{rules:}.
    """

    action: Action
    methods: frozenset[str] | None
    path: str
    path_re: re.Pattern[str] = field(repr=False)
    query: tuple[tuple[str, re.Pattern[str]], ...]
    index: int


@dataclass(frozen=True)
class InterceptEntry:
    """One C{policy.intercept} entry.

    C{host} is normalised as in L{AllowRule}: for a wildcard entry it is the
    suffix after C{"*."}, an IPv4-mapped IPv6 literal is stored as the IPv4
    address, and C{ip} is set for IP literals.  C{access} None means no
    preset.  C{upstream_ca} is the path as configured; C{upstream_ca_certs}
    holds the certificates read from it at load time, one PEM each, to trust
    instead of the system store.  C{index} is the entry's place in the list.
    """

    host: str
    wildcard: bool
    ip: IPAddress | None
    port: int
    access: str | None
    rules: tuple[Rule, ...]
    mode: str
    deny_reason: str | None
    upstream_ca: str | None
    upstream_ca_certs: tuple[bytes, ...] = field(repr=False)
    inference: bool
    index: int

    @property
    def pattern(self) -> str:
        """The host as an operator reads it: C{"*.example.com"}, C{"::1"}."""
        return f"*.{self.host}" if self.wildcard else self.host

    @property
    def display(self) -> str:
        """Host and port as in C{policy.allow}: C{"api.github.com:443"}, C{"[::1]:8443"}."""
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.pattern
        return f"{host}:{self.port}"

    @property
    def denies_everything(self) -> bool:
        """Neither a preset nor an allow rule: every request is refused."""
        return not self.inference and self.access is None and not any(r.action == "allow" for r in self.rules)

    def matches(self, host: str, port: int) -> bool:
        """Whether this entry covers C{host} (from L{canonical_host}) on C{port},
        with the very semantics of a C{policy.allow} entry."""
        return AllowRule(self.host, self.wildcard, self.port, self.ip).matches(host, port)


@dataclass(frozen=True)
class Decision:
    """The verdict on one request.

    C{allowed}: whether the request proceeds (also for C{"would_deny"} in
    audit mode).  C{entry}: the entry's index; C{rule}: the index of the rule
    that decided, or what else did (see L{Decider}).  C{detail}: one line for
    the agent and the log, e.g. C{"POST api.github.com/gists not permitted by
    policy"}; it never contains the query, whose values may be secrets.
    """

    allowed: bool
    verdict: Verdict
    entry: int
    rule: Decider
    detail: str


class _Refused(Exception):
    """A request target (or a configured path) that cannot be judged safely."""


def decide(entry: InterceptEntry, method: bytes | str, path_and_query: bytes, *, host: str | None = None) -> Decision:
    """Judge one request to C{entry}: C{method} and the raw request-target in
    origin-form (C{b"/path?query"}), as received.

    Deny rules come first, then allow rules, then the access preset, else
    the request is denied; in audit mode a denial becomes C{"would_deny"} and
    the request proceeds.  C{host} (the normalised name the client asked
    for) is used in C{detail}; without it the entry's pattern is.  Inference entries are
    served by the inference router, never judged here: they are refused.
    """
    name = entry.pattern if host is None else host
    text = method.decode("latin-1") if isinstance(method, bytes) else method
    if entry.inference:
        return _deny(entry, "inference", f"{name} is served by the inference router, not by request rules")
    if not text or not set(text.encode("latin-1", "replace")) <= _TCHAR:
        return _deny(entry, "target", f"request to {name} refused: the method is not a valid HTTP token")
    try:
        raw_path, path, query = _parse_target(path_and_query)
    except _Refused as exc:
        return _deny(entry, "target", f"{text} {name} refused: {exc}")
    request = f"{text} {name}{raw_path}"
    for rule in entry.rules:
        if rule.action == "deny" and _matches(rule, text, path, query):
            return _deny(entry, rule.index, f"{request} not permitted by policy")
    for rule in entry.rules:
        if rule.action == "allow" and _matches(rule, text, path, query):
            return Decision(True, "allow", entry.index, rule.index, f"{request} allowed by rule {rule.index}")
    if entry.access is not None:
        methods = ACCESS_PRESETS[entry.access]
        if methods is None or text in methods:
            return Decision(True, "allow", entry.index, "preset", f"{request} allowed by access {entry.access}")
    return _deny(entry, "default", f"{request} not permitted by policy")


def _deny(entry: InterceptEntry, rule: Decider, detail: str) -> Decision:
    if entry.mode == "audit":
        return Decision(True, "would_deny", entry.index, rule, detail)
    return Decision(False, "deny", entry.index, rule, detail)


def _matches(rule: Rule, method: str, path: str, query: list[tuple[str, str]]) -> bool:
    """Allow rules match exactly and need every occurrence of a parameter to
    match; deny rules ignore case and need one occurrence to match."""
    deny = rule.action == "deny"
    if rule.methods is not None and (method.upper() if deny else method) not in rule.methods:
        return False
    if not rule.path_re.fullmatch(path):
        return False
    for name, value_re in rule.query:
        values = [v for n, v in query if (n.casefold() == name.casefold() if deny else n == name)]
        test = any if deny else all
        if not values or not test(value_re.fullmatch(v) for v in values):
            return False
    return True


def _parse_target(target: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    """The raw path (for messages), the normalised path (C{""} for the root,
    else C{"/seg/seg"}) and the decoded query parameters in order."""
    if not target.startswith(b"/"):
        raise _Refused("the request target is not an absolute path")
    if b"#" in target or any(b < 0x21 or b > 0x7E for b in target):
        raise _Refused("invalid character in the request target")
    raw_path, _, raw_query = target.partition(b"?")
    if b";" in raw_path:
        raise _Refused("';' in the path")
    path = "".join("/" + segment for segment in _segments(raw_path))
    query: list[tuple[str, str]] = []
    # Some servers also split on ';', so a deny rule must see those parts.
    for item in re.split(rb"[&;]", raw_query):
        if item:
            name, _, value = item.partition(b"=")
            query.append((_unquote(name, plus=True), _unquote(value, plus=True)))
    return raw_path.decode("ascii"), path, query


def _segments(raw: bytes) -> list[str]:
    """The decoded segments of a path starting with C{/}; one trailing slash
    is dropped.  See the module docstring for what is refused and why."""
    parts = raw.split(b"/")[1:]
    if parts[-1] == b"":
        parts.pop()
    segments: list[str] = []
    for part in parts:
        if not part:
            raise _Refused("empty path segment ('//')")
        segment = _unquote(part)
        if segment in (".", ".."):
            raise _Refused("'.' or '..' segment in the path")
        if "/" in segment or "\\" in segment:
            raise _Refused("encoded '/' or a '\\' in the path")
        segments.append(segment)
    return segments


def _unquote(raw: bytes, plus: bool = False) -> str:
    """Strict percent-decoding (C{+} is a space in the query); bytes that
    are not UTF-8 survive as surrogates, matching only wildcards."""
    if plus:
        raw = raw.replace(b"+", b" ")
    first, *rest = raw.split(b"%")
    out = bytearray(first)
    for piece in rest:
        if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
            raise _Refused("malformed percent-encoding")
        out.append(int(piece[:2], 16))
        out += piece[2:]
    if any(b < 0x20 or b == 0x7F for b in out):
        raise _Refused("control character in the path or query")
    return out.decode("utf-8", "surrogateescape")


def startup_notes(entries: Sequence[InterceptEntry], path: str = "policy.intercept") -> tuple[str, ...]:
    """One line per entry that is configured but does not restrict as it may
    seem to: one that denies everything, one in audit mode.  For the log at
    start and reload, so no policy is silently inactive."""
    notes: list[str] = []
    for entry in entries:
        where = f"{path}[{entry.index}]: {entry.display}"
        if entry.denies_everything:
            notes.append(f"{where} has neither an access preset nor an allow rule: every request is denied")
        if entry.mode == "audit":
            notes.append(f"{where} is in audit mode: nothing is denied, would-be denials are only logged")
    return tuple(notes)


# Parsing.  Errors are one line naming the key path; null counts as absent,
# as everywhere in the config.


def parse_intercept(entries: Sequence[object], path: str = "policy.intercept") -> tuple[InterceptEntry, ...]:
    """Parse and validate the C{policy.intercept} list.

    @raise ValueError: naming the key path, e.g.
        C{"policy.intercept[2].rules[0].allow.method: ..."}.
    """
    parsed: list[InterceptEntry] = []
    for i, data in enumerate(entries):
        entry = _entry(data, f"{path}[{i}]", i)
        for other in parsed:
            if (other.host, other.wildcard, other.port) == (entry.host, entry.wildcard, entry.port):
                raise ValueError(f"{path}[{i}]: {entry.display} is already listed in {path}[{other.index}]")
        parsed.append(entry)
    return tuple(parsed)


def check_overlap(
    entries: Sequence[InterceptEntry],
    allow: Sequence[AllowRule],
    path: str = "policy.intercept",
    allow_path: str = "policy.allow",
) -> None:
    """Refuse an intercept entry that some allow entry also covers: the
    opaque tunnel would make its rules optional.  Covered means some host and
    port would match both (a wildcard on either side counts).

    @raise ValueError: naming both entries.
    """
    for entry in entries:
        for j, rule in enumerate(allow):
            if (rule.port is None or rule.port == entry.port) and _hosts_overlap(entry, rule):
                raise ValueError(f"{path}[{entry.index}]: {entry.display} is also listed in {allow_path}[{j}]")


def _hosts_overlap(entry: InterceptEntry, rule: AllowRule) -> bool:
    """Whether some host matches both; each side keeps its own wildcard
    semantics (never the bare suffix), so only two wildcards need more."""
    if not rule.wildcard:
        return entry.matches(canonical_host(rule.host), entry.port)
    if not entry.wildcard:
        return rule.matches(entry.host, entry.port)
    a, b = entry.host, rule.host
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _entry(data: object, where: str, index: int) -> InterceptEntry:
    fields = _fields(data, where, _ENTRY_KEYS)
    inference = _get(fields, "inference", where, bool, "true or false")
    if inference:
        for key in _ENTRY_KEYS:
            if key not in _INFERENCE_KEYS and fields.get(key) is not None:
                raise ValueError(
                    f"{where}.{key}: not allowed with inference: true (the inference router serves this host)"
                )
    host, wildcard, ip = _host(fields, where)
    port = _get(fields, "port", where, int, "an integer")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{where}.port: must be a number from 1 to 65535")
    access = _choice(fields, "access", where, tuple(ACCESS_PRESETS))
    rules = _get(fields, "rules", where, list, "a list") or []
    deny_reason = _get(fields, "deny_reason", where, str, "a string")
    if deny_reason is not None and (not deny_reason.strip() or not deny_reason.isprintable()):
        raise ValueError(f"{where}.deny_reason: must be one line of printable text")
    upstream_ca = _get(fields, "upstream_ca", where, str, "a string")
    return InterceptEntry(
        host=host,
        wildcard=wildcard,
        ip=ip,
        port=443 if port is None else port,
        access=access,
        rules=tuple(_rule(item, f"{where}.rules[{j}]", j) for j, item in enumerate(rules)),
        mode=_choice(fields, "mode", where, MODES) or "enforce",
        deny_reason=deny_reason,
        upstream_ca=upstream_ca,
        upstream_ca_certs=() if upstream_ca is None else _read_ca(upstream_ca, f"{where}.upstream_ca"),
        inference=bool(inference),
        index=index,
    )


def _host(fields: Mapping[str, object], entry_where: str) -> tuple[str, bool, IPAddress | None]:
    """Validated as a C{policy.allow} host is, without the port."""
    where = f"{entry_where}.host"
    text = _get(fields, "host", entry_where, str, "a string")
    if text is None:
        raise ValueError(f"{where}: required key is missing")
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if "*" in name:
        raise ValueError(f"{where}: {text!r}: '*' is allowed only as the whole first label, as in '*.example.com'")
    try:
        name = canonical_host(name)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    ip = parse_ip(name)
    if wildcard and ip is not None:
        raise ValueError(f"{where}: {text!r}: a wildcard cannot be combined with an IP address")
    if wildcard and "." not in name:
        raise ValueError(
            f"{where}: {text!r}: too broad: a wildcard needs a suffix of at least two labels, as in '*.example.com'"
        )
    return name, wildcard, ip


def _rule(data: object, where: str, index: int) -> Rule:
    outer = _fields(data, where, ("allow", "deny"))
    if len(outer) != 1:
        raise ValueError(f"{where}: expected exactly one key, allow or deny")
    action: Action = "allow" if "allow" in outer else "deny"
    where = f"{where}.{action}"
    body = _fields(outer[action], where, _RULE_KEYS)
    if all(body.get(key) is None for key in _RULE_KEYS):
        raise ValueError(f"{where}: needs at least one of {', '.join(_RULE_KEYS)}")
    flags = re.IGNORECASE if action == "deny" else 0
    path = _get(body, "path", where, str, "a string")
    path = "/**" if path is None else path
    try:
        path_re = _path_regex(path, flags)
    except _Refused as exc:
        raise ValueError(f"{where}.path: {path!r}: {exc}") from None
    return Rule(
        action=action,
        methods=_methods(body.get("method"), f"{where}.method", action),
        path=path,
        path_re=path_re,
        query=_query(body, where, flags),
        index=index,
    )


def _methods(value: object, where: str, action: Action) -> frozenset[str] | None:
    """None for C{"*"} (any method); names are upper-cased."""
    if value is None or value == "*":
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: expected a method name, a non-empty list of them or '*', got {_kind(value)}")
    methods: set[str] = set()
    for i, item in enumerate(items):
        at = where if isinstance(value, str) else f"{where}[{i}]"
        if not isinstance(item, str):
            raise ValueError(f"{at}: expected a string, got {_kind(item)}")
        if item == "*":
            raise ValueError(f"{at}: '*' must be the whole value, not a list item")
        if not item or not item.isascii() or not set(item.encode()) <= _TCHAR:
            raise ValueError(f"{at}: {item!r} is not a valid HTTP method name")
        if item.upper() in methods:
            raise ValueError(f"{at}: duplicate {item!r}")
        methods.add(item.upper())
    return frozenset(methods)


def _path_regex(glob: str, flags: int) -> re.Pattern[str]:
    """C{*} is any run of characters within one segment, a C{**} segment any
    number of segments (zero included); every other character is literal.
    The glob is normalised as request paths are, so C{%20} and a space agree."""
    if not glob.startswith("/"):
        raise _Refused("must start with '/'")
    try:
        raw = glob.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused("not valid Unicode text") from None
    parts: list[str] = []
    for segment in _segments(raw):
        if segment == "**":
            parts.append("(?:/[^/]+)*")
        elif "**" in segment:
            raise _Refused("'**' must be a whole segment, as in '/a/**/b'")
        else:
            parts.append("/" + "[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    return re.compile("".join(parts), flags | re.DOTALL)


def _query(body: Mapping[str, object], where: str, flags: int) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """C{{name: glob}}: each named parameter must be present with a value
    matching the glob, in which C{*} is any run of characters."""
    value = body.get("query")
    if value is None:
        return ()
    where = f"{where}.query"
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: expected a non-empty mapping of parameter names to globs, got {_kind(value)}")
    pairs: list[tuple[str, re.Pattern[str]]] = []
    for name, glob in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: parameter names must be non-empty strings")
        if not isinstance(glob, str):
            raise ValueError(f"{where}.{name}: expected a string, got {_kind(glob)}")
        pairs.append((name, re.compile(".*".join(re.escape(piece) for piece in glob.split("*")), flags | re.DOTALL)))
    return tuple(pairs)


def _read_ca(path: str, where: str) -> tuple[bytes, ...]:
    """The certificates in the PEM bundle at C{path}, one PEM each."""
    full = os.path.expanduser(path)
    try:
        if not stat.S_ISREG(os.stat(full).st_mode):  # a FIFO or device could block or never end
            raise ValueError(f"{where}: {path!r} is not a regular file")
        with open(full, "rb") as f:
            data = f.read(_MAX_CA_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{where}: cannot read {path!r}: {exc.strerror}") from None
    if len(data) > _MAX_CA_BYTES:
        raise ValueError(f"{where}: {path!r} is larger than {_MAX_CA_BYTES // (1024 * 1024)} MiB")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{where}: {path!r} holds no valid PEM certificate") from None
    return tuple(c.public_bytes(Encoding.PEM) for c in certificates)


def _fields(value: object, where: str, allowed: tuple[str, ...]) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {_kind(value)}")
    for key in value:
        if key not in allowed:
            raise ValueError(f"{where}.{key}: unknown key (allowed: {', '.join(allowed)})")
    return value


def _get(fields: Mapping[str, object], key: str, where: str, kind: type[_T], expected: str) -> _T | None:
    """C{fields[key]} if it is a C{kind} (bools are not integers), None if absent."""
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}.{key}: expected {expected}, got {_kind(value)}")
    return value


def _choice(fields: Mapping[str, object], key: str, where: str, choices: tuple[str, ...]) -> str | None:
    value = _get(fields, key, where, str, "a string")
    if value is not None and value not in choices:
        raise ValueError(f"{where}.{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _kind(value: object) -> str:
    """The type of C{value} in words, as config errors name it."""
    kinds = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number",
             str: "a string", list: "a list", dict: "a mapping"}
    return kinds.get(type(value), type(value).__name__)
