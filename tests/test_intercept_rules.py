"""Tests for navtwist.intercept.rules: parsing intercept entries, matching requests, picking entries."""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from navtwist.config import ConfigError, load_config, parse_config
from navtwist.intercept.rules import (
    Decision,
    InterceptEntry,
    decide,
    parse_intercept,
    startup_notes,
)
from navtwist.egress.policy import Policy, find_entry

ENV = {"NVIDIA_API_KEY": "nvapi-TOPSECRET"}
ROUTES = [
    {
        "name": "inference.local",
        "endpoint": "https://integrate.api.nvidia.com/v1",
        "model": "m",
        "protocols": ["openai_chat_completions"],
        "api_key_env": "NVIDIA_API_KEY",
    }
]


def _entry(**fields: Any) -> InterceptEntry:
    """One parsed entry for api.github.com unless C{host} is given."""
    (entry,) = parse_intercept([{"host": "api.github.com", **fields}])
    return entry


def _rules(*rules: dict[str, Any], **fields: Any) -> InterceptEntry:
    return _entry(rules=list(rules), **fields)


def _verdict(entry: InterceptEntry, method: str, target: bytes) -> str:
    return decide(entry, method, target).verdict


def _pem_certificate(common_name: str = "origin test CA") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


# The config of issue 12, as written there.
ISSUE_CONFIG = """\
routes:
  - name: inference.local
    endpoint: https://integrate.api.nvidia.com/v1
    model: m
    protocols: [openai_chat_completions]
    api_key_env: NVIDIA_API_KEY
policy:
  allow: ["pypi.org:443"]
  intercept:
    - host: "api.github.com"
      port: 443
      access: read-only
      rules:
        - allow: {method: [GET, POST], path: "/repos/acme/*/git-upload-pack"}
        - deny:  {method: "*", path: "/gists/**"}
      mode: enforce
      deny_reason: "ask the operator"
      upstream_ca: "CA_PATH"
    - host: "api.anthropic.com"
      inference: true
ca_name_constraints: true
audit_log: /var/log/navtwist/audit.jsonl
"""


def test_issue_config_parses_as_written(tmp_path: Path) -> None:
    ca = tmp_path / "origin-ca.pem"
    ca.write_bytes(_pem_certificate("one") + b"junk between blocks\n" + _pem_certificate("two"))
    path = tmp_path / "navtwist.yaml"
    path.write_text(ISSUE_CONFIG.replace("CA_PATH", str(ca)), encoding="utf-8")
    config = load_config(str(path), ENV)
    github, anthropic = config.policy.intercept
    assert (github.host, github.wildcard, github.ip, github.port) == ("api.github.com", False, None, 443)
    assert (github.access, github.mode, github.deny_reason) == ("read-only", "enforce", "ask the operator")
    assert github.upstream_ca == str(ca)
    assert [x509.load_pem_x509_certificate(pem).subject.rfc4514_string() for pem in github.upstream_ca_certs] == [
        "CN=one",
        "CN=two",
    ]
    allow, deny = github.rules
    assert (allow.action, allow.methods, allow.path, allow.index) == (
        "allow", frozenset({"GET", "POST"}), "/repos/acme/*/git-upload-pack", 0,
    )
    assert (deny.action, deny.methods, deny.path, deny.index) == ("deny", None, "/gists/**", 1)
    assert (github.inference, github.index) == (False, 0)
    assert (anthropic.host, anthropic.port, anthropic.inference, anthropic.index) == ("api.anthropic.com", 443, True, 1)
    assert (anthropic.access, anthropic.rules, anthropic.mode) == (None, (), "enforce")
    assert config.policy.allows("pypi.org", 443)
    assert config.policy.intercept_for("API.GitHub.com.", 443) is github
    assert config.policy.intercept_for("api.github.com", 8443) is None
    assert config.ca_name_constraints is True
    assert config.audit_log == "/var/log/navtwist/audit.jsonl"

    assert decide(github, b"POST", b"/repos/acme/tool/git-upload-pack") == Decision(
        True, "allow", 0, 0, "POST api.github.com/repos/acme/tool/git-upload-pack allowed by rule 0"
    )
    assert decide(github, b"GET", b"/gists/abc?access_token=SECRET") == Decision(
        False, "deny", 0, 1, "GET api.github.com/gists/abc not permitted by policy"
    )
    assert decide(github, b"GET", b"/user") == Decision(
        True, "allow", 0, "preset", "GET api.github.com/user allowed by access read-only"
    )
    assert decide(github, b"POST", b"/gists?x=SECRET") == Decision(
        False, "deny", 0, 1, "POST api.github.com/gists not permitted by policy"
    )
    assert decide(github, b"POST", b"/user/repos") == Decision(
        False, "deny", 0, "default", "POST api.github.com/user/repos not permitted by policy"
    )


def test_top_level_defaults_and_values() -> None:
    config = parse_config({"routes": ROUTES}, ENV)
    assert (config.ca_name_constraints, config.audit_log, config.policy.intercept) == (True, None, ())
    config = parse_config({"routes": ROUTES, "ca_name_constraints": False, "audit_log": "audit.jsonl"}, ENV)
    assert (config.ca_name_constraints, config.audit_log) == (False, "audit.jsonl")


@pytest.mark.parametrize("section", [{"intercept": None}, {"intercept": []}, {"allow": ["a.example:443"], "intercept": []}])
def test_absent_or_empty_intercept_intercepts_nothing(section: dict[str, Any]) -> None:
    policy = parse_config({"routes": ROUTES, "policy": section}, ENV).policy
    assert policy.intercept == ()
    assert policy.intercept_for("a.example", 443) is None


# Path globs.  Each case: glob, request target, whether it matches.
GLOB_CASES = [
    ("/repos/*", b"/repos/acme", True),
    ("/repos/*", b"/repos/acme/", True),  # one trailing slash is ignored
    ("/repos/*", b"/repos/acme/tool", False),  # '*' never crosses a '/'
    ("/repos/*", b"/repos", False),  # '*' is exactly one segment
    ("/repos/*", b"/repos/", False),
    ("/repos/*/x", b"/repos/acme/x", True),
    ("/repos/*/x", b"/repos/a/b/x", False),
    ("/repos/*.git", b"/repos/tool.git", True),  # '*' inside a segment
    ("/repos/*.git", b"/repos/.git/x", False),
    ("/repos/*.git", b"/repos/toolxgit", False),  # '.' is literal
    ("/gists/**", b"/gists", True),  # '**' is any number of segments, zero included
    ("/gists/**", b"/gists/", True),
    ("/gists/**", b"/gists/a", True),
    ("/gists/**", b"/gists/a/b/c", True),
    ("/gists/**", b"/gistsx", False),
    ("/gists/**", b"/x/gists", False),
    ("/**/git-receive-pack", b"/git-receive-pack", True),
    ("/**/git-receive-pack", b"/acme/tool.git/git-receive-pack", True),
    ("/**/git-receive-pack", b"/acme/git-receive-pack/x", False),
    ("/a/**/b", b"/a/b", True),
    ("/a/**/b", b"/a/x/y/b", True),
    ("/a/**/b", b"/a/x/y/c", False),
    ("/**", b"/", True),
    ("/**", b"/anything/at/all", True),
    ("/", b"/", True),
    ("/", b"/a", False),
    ("/a/b/", b"/a/b", True),  # the glob's trailing slash is ignored too
    ("/a?b", b"/a%3Fb", True),  # '?' is literal
    ("/a?b", b"/axb", False),
    ("/[x]", b"/[x]", True),  # '[' is literal
    ("/[x]", b"/x", False),
    ("/a b", b"/a%20b", True),  # globs and paths are compared decoded
    ("/a%20b", b"/a%20b", True),
    ("/a%20b", b"/a+b", False),  # '+' is a space only in the query
    ("/caf\u00e9", b"/caf%C3%A9", True),
    ("/gists/*", b"/gist%73/1", True),  # decoding cannot hide a literal
    ("/Repos", b"/repos", False),  # allow rules are case-sensitive
]


@pytest.mark.parametrize(("glob", "target", "matches"), GLOB_CASES)
def test_path_glob(glob: str, target: bytes, matches: bool) -> None:
    entry = _rules({"allow": {"path": glob}})
    assert _verdict(entry, "GET", target) == ("allow" if matches else "deny")


def test_allow_rule_needs_method_and_path_to_match() -> None:
    entry = _rules({"allow": {"method": ["GET", "post"], "path": "/repos/**"}})
    assert _verdict(entry, "GET", b"/repos/a") == "allow"
    assert _verdict(entry, "POST", b"/repos/a") == "allow"  # config names are upper-cased
    assert _verdict(entry, "post", b"/repos/a") == "deny"  # request methods are case-sensitive
    assert _verdict(entry, "PUT", b"/repos/a") == "deny"
    assert _verdict(entry, "GET", b"/user") == "deny"


def test_rule_without_method_or_path_matches_any() -> None:
    assert _verdict(_rules({"allow": {"path": "/a"}}), "DELETE", b"/a") == "allow"
    assert _verdict(_rules({"allow": {"method": "GET"}}), "GET", b"/a/b/c") == "allow"
    assert _verdict(_rules({"allow": {"method": "*"}}), "PROPFIND", b"/") == "allow"


# Presets: which methods each allows.
@pytest.mark.parametrize(
    ("access", "allowed"),
    [
        ("read-only", {"GET", "HEAD", "OPTIONS"}),
        ("read-write", {"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH"}),
        ("full", {"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "PROPFIND", "get"}),
    ],
)
def test_access_presets(access: str, allowed: set[str]) -> None:
    entry = _entry(access=access)
    for method in ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "PROPFIND", "get"):
        decision = decide(entry, method, b"/any/path")
        assert decision.allowed is (method in allowed), method
        assert decision.rule == ("preset" if method in allowed else "default")


def test_entry_without_preset_or_allow_rule_denies_everything() -> None:
    for entry in (_entry(), _rules(), _rules({"deny": {"path": "/x"}})):
        assert entry.denies_everything
        assert decide(entry, "GET", b"/") == Decision(False, "deny", 0, "default", "GET api.github.com/ not permitted by policy")
    assert not _entry(access="read-only").denies_everything
    assert not _rules({"allow": {"path": "/x"}}).denies_everything


def test_startup_notes_name_entries_that_deny_everything_or_only_audit() -> None:
    entries = parse_intercept([
        {"host": "a.example", "access": "full"},
        {"host": "b.example"},
        {"host": "::1", "port": 8443, "access": "read-only", "mode": "audit"},
        {"host": "api.anthropic.com", "inference": True},
    ])
    assert startup_notes(entries) == (
        "policy.intercept[1]: b.example:443 has neither an access preset nor an allow rule: every request is denied",
        "policy.intercept[2]: [::1]:8443 is in audit mode: nothing is denied, would-be denials are only logged",
    )


def test_deny_rule_wins_over_allow_rule_and_preset_wherever_listed() -> None:
    allow_first = _rules(
        {"allow": {"method": "POST", "path": "/gists/**"}},
        {"deny": {"method": "POST", "path": "/gists/**"}},
        access="full",
    )
    assert decide(allow_first, "POST", b"/gists/1") == Decision(
        False, "deny", 0, 1, "POST api.github.com/gists/1 not permitted by policy"
    )
    assert decide(allow_first, "GET", b"/gists/1").rule == "preset"
    deny_first = _rules({"deny": {"path": "/gists"}}, {"allow": {"path": "/gists"}})
    assert decide(deny_first, "GET", b"/gists").rule == 0


def test_first_matching_allow_rule_is_reported() -> None:
    entry = _rules({"allow": {"path": "/a"}}, {"allow": {"path": "/**"}}, access="read-only")
    assert decide(entry, "GET", b"/a").rule == 0
    assert decide(entry, "GET", b"/b").rule == 1


def test_deny_rules_ignore_case_so_no_spelling_slips_past() -> None:
    entry = _rules(
        {"deny": {"method": "DELETE"}},
        {"deny": {"path": "/repos/acme/secret/**"}},
        access="full",
    )
    assert _verdict(entry, "delete", b"/x") == "deny"
    assert _verdict(entry, "Delete", b"/x") == "deny"
    assert _verdict(entry, "GET", b"/repos/ACME/Secret/issues") == "deny"
    assert _verdict(entry, "GET", b"/repos/acme/public") == "allow"


# Query conditions.
GIT_FETCH = {"allow": {"method": "GET", "path": "/**/info/refs", "query": {"service": "git-upload-pack"}}}


@pytest.mark.parametrize(
    ("query", "verdict"),
    [
        (b"?service=git-upload-pack", "allow"),
        (b"?other=1&service=git-upload-pack&x", "allow"),
        (b"?service=git%2Dupload%2Dpack", "allow"),  # values are compared decoded
        (b"?service=git-receive-pack", "deny"),
        (b"", "deny"),  # a named parameter must be present
        (b"?", "deny"),
        (b"?services=git-upload-pack", "deny"),
        (b"?SERVICE=git-upload-pack", "deny"),  # allow rules are case-sensitive
        (b"?service=git-upload-pack&service=git-receive-pack", "deny"),  # every occurrence must match
        (b"?service=git-upload-pack;service=git-receive-pack", "deny"),  # ';' separates as well
        (b"?service=git-upload-pack%00", "deny"),
    ],
)
def test_allow_rule_query(query: bytes, verdict: str) -> None:
    assert _verdict(_rules(GIT_FETCH), "GET", b"/acme/tool.git/info/refs" + query) == verdict


@pytest.mark.parametrize(
    ("query", "verdict"),
    [
        (b"?service=git-receive-pack", "deny"),
        (b"?service=git-upload-pack&service=git-receive-pack", "deny"),  # any occurrence matches
        (b"?x=1;service=git-receive-pack", "deny"),
        (b"?SERVICE=GIT-RECEIVE-PACK", "deny"),  # deny rules ignore case
        (b"?service=git%2dreceive-pack", "deny"),
        (b"?service=git-upload-pack", "allow"),
        (b"", "allow"),
    ],
)
def test_deny_rule_query(query: bytes, verdict: str) -> None:
    entry = _rules({"deny": {"query": {"service": "git-receive-pack"}}}, access="full")
    assert _verdict(entry, "GET", b"/info/refs" + query) == verdict


def test_query_value_globs() -> None:
    entry = _rules({"allow": {"query": {"flag": "*", "page": "1*", "q": "a b"}}})
    assert _verdict(entry, "GET", b"/?flag&page=12&q=a+b") == "allow"  # '*' matches the empty value; '+' is a space
    assert _verdict(entry, "GET", b"/?flag=&page=1&q=a%20b") == "allow"
    assert _verdict(entry, "GET", b"/?flag=x&page=21&q=a+b") == "deny"
    assert _verdict(entry, "GET", b"/?page=1&q=a+b") == "deny"


def test_audit_mode_lets_would_be_denials_through() -> None:
    entry = _rules({"deny": {"path": "/gists/**"}}, access="read-only", mode="audit")
    assert decide(entry, "POST", b"/gists") == Decision(True, "would_deny", 0, 0, "POST api.github.com/gists not permitted by policy")
    assert decide(entry, "POST", b"/user") == Decision(True, "would_deny", 0, "default", "POST api.github.com/user not permitted by policy")
    assert decide(entry, "GET", b"/a/../gists") .verdict == "would_deny"
    assert decide(entry, "GET", b"/user") == Decision(True, "allow", 0, "preset", "GET api.github.com/user allowed by access read-only")


# Request targets refused whatever the rules say, because the origin might
# read them differently from navtwist.
REFUSED_TARGETS = [
    (b"/repos/acme/../../gists", "'.' or '..' segment in the path"),
    (b"/a/%2e%2e/gists", "'.' or '..' segment in the path"),
    (b"/a/%2E%2e/gists", "'.' or '..' segment in the path"),
    (b"/a/.%2e/gists", "'.' or '..' segment in the path"),
    (b"/a/./gists", "'.' or '..' segment in the path"),
    (b"/a/..", "'.' or '..' segment in the path"),
    (b"/..", "'.' or '..' segment in the path"),
    (b"/a/%2e/", "'.' or '..' segment in the path"),
    (b"/a%2Fgists", "encoded '/' or a '\\' in the path"),
    (b"/a%2fgists", "encoded '/' or a '\\' in the path"),
    (b"/a\\..\\gists", "encoded '/' or a '\\' in the path"),
    (b"/a%5Cgists", "encoded '/' or a '\\' in the path"),
    (b"//gists/1", "empty path segment ('//')"),
    (b"/a//gists", "empty path segment ('//')"),
    (b"/a//", "empty path segment ('//')"),
    (b"/gists;x/1", "';' in the path"),
    (b"/gists%00/1", "control character in the path or query"),
    (b"/gists%0a", "control character in the path or query"),
    (b"/a?x=%7f", "control character in the path or query"),
    (b"/a%zz", "malformed percent-encoding"),
    (b"/a%2", "malformed percent-encoding"),
    (b"/a?x=%", "malformed percent-encoding"),
    (b"*", "the request target is not an absolute path"),
    (b"http://api.github.com/gists", "the request target is not an absolute path"),
    (b"", "the request target is not an absolute path"),
    (b"/a#b", "invalid character in the request target"),
    (b"/a b", "invalid character in the request target"),
    (b"/caf\xc3\xa9", "invalid character in the request target"),
]


@pytest.mark.parametrize(("target", "reason"), REFUSED_TARGETS)
def test_ambiguous_targets_are_refused_even_under_full_access(target: bytes, reason: str) -> None:
    entry = _rules({"allow": {"path": "/**"}}, access="full")
    assert decide(entry, "GET", target) == Decision(False, "deny", 0, "target", f"GET api.github.com refused: {reason}")


@pytest.mark.parametrize("target", [b"/a/..b", b"/.well-known/x", b"/a%3Bb", b"/a%20b", b"/a/%2e%2e%2e", b"/a?x=1;y", b"/x%FF"])
def test_unusual_but_unambiguous_targets_are_judged_by_the_rules(target: bytes) -> None:
    assert _verdict(_entry(access="full"), "GET", target) == "allow"


@pytest.mark.parametrize("method", [b"", b"GE T", b"GET\r\n", b"G\xc3\xa9T", "G\u20acT", b"(GET)"])
def test_invalid_methods_are_refused(method: bytes | str) -> None:
    assert decide(_entry(access="full"), method, b"/") == Decision(
        False, "deny", 0, "target", "request to api.github.com refused: the method is not a valid HTTP token"
    )


def test_detail_names_the_requested_host() -> None:
    (entry,) = parse_intercept([{"host": "*.example.com"}])
    assert decide(entry, "GET", b"/x?k=v").detail == "GET *.example.com/x not permitted by policy"
    assert decide(entry, "GET", b"/x", host="a.example.com").detail == "GET a.example.com/x not permitted by policy"


def test_inference_entries_are_not_judged_by_rules() -> None:
    entry = _entry(inference=True)
    assert decide(entry, "POST", b"/v1/messages") == Decision(
        False, "deny", 0, "inference", "api.github.com is served by the inference router, not by request rules"
    )
    assert not entry.denies_everything


# Picking the entry for a host.
ENTRIES = parse_intercept([
    {"host": "*.example.com"},
    {"host": "*.api.example.com"},
    {"host": "www.example.com"},
    {"host": "www.example.com", "port": 8443},
    {"host": "::ffff:10.0.0.1"},
    {"host": "[2001:DB8::1]"},
    {"host": "192.0.2.7", "port": 8080},
])


@pytest.mark.parametrize(
    ("host", "port", "index"),
    [
        ("www.example.com", 443, 2),  # exact beats wildcard, listed before it or not
        ("WWW.Example.COM.", 443, 2),
        ("www.example.com", 8443, 3),
        ("www.example.com", 80, None),
        ("a.example.com", 443, 0),
        ("a.b.example.com", 443, 0),
        ("v1.api.example.com", 443, 1),  # the longer wildcard suffix wins
        ("api.example.com", 443, 0),  # a wildcard never matches its bare suffix
        ("example.com", 443, None),
        ("10.0.0.1", 443, 4),  # IPv4-mapped IPv6 and IPv4 are one address
        ("::ffff:10.0.0.1", 443, 4),
        ("[::ffff:a00:1]", 443, 4),
        ("2001:db8::1", 443, 5),
        ("[2001:db8:0::1]", 443, 5),
        ("192.0.2.7", 8080, 6),
        ("[::ffff:192.0.2.7]", 8080, 6),
        ("192.0.2.7", 443, None),
        ("10.1", 443, None),  # a lenient IPv4 form matches nothing
        ("bad host", 443, None),
        ("", 443, None),
    ],
)
def test_find_entry(host: str, port: int, index: int | None) -> None:
    found = find_entry(ENTRIES, host, port)
    assert (found.index if found is not None else None) == index
    assert Policy(intercept=ENTRIES).intercept_for(host, port) is found


def test_ip_entries_are_stored_canonically() -> None:
    mapped, v6 = ENTRIES[4], ENTRIES[5]
    assert (mapped.host, str(mapped.ip), mapped.display) == ("10.0.0.1", "10.0.0.1", "10.0.0.1:443")
    assert (v6.host, v6.display, v6.pattern) == ("2001:db8::1", "[2001:db8::1]:443", "2001:db8::1")
    assert (ENTRIES[0].host, ENTRIES[0].wildcard, ENTRIES[0].display) == ("example.com", True, "*.example.com:443")


# Config errors: the exact one-line message.
def _intercept_error(entries: object, allow: list[str] | None = None) -> str:
    policy: dict[str, Any] = {"intercept": entries}
    if allow is not None:
        policy["allow"] = allow
    with pytest.raises(ConfigError) as info:
        parse_config({"routes": ROUTES, "policy": policy}, ENV)
    return str(info.value)


P = "policy.intercept[0]"
R = "policy.intercept[0].rules[0]"
ERROR_CASES: list[tuple[str, object, str]] = [
    ("not-list", "api.github.com", "policy.intercept: expected a list, got a string"),
    ("entry-string", ["api.github.com"], f"{P}: expected a mapping, got a string"),
    ("unknown-key", [{"host": "a.example", "methods": []}],
     f"{P}.methods: unknown key (allowed: host, port, access, rules, mode, deny_reason, upstream_ca, inference)"),
    ("host-missing", [{"access": "full"}], f"{P}.host: required key is missing"),
    ("host-number", [{"host": 443}], f"{P}.host: expected a string, got an integer"),
    ("host-invalid", [{"host": "ex ample.com"}], f"{P}.host: invalid host 'ex ample.com': invalid character ' '"),
    ("host-lenient-ip", [{"host": "127.1"}],
     f"{P}.host: invalid host '127.1': ambiguous IP address form (write IPv4 as a plain dotted quad)"),
    ("host-port", [{"host": "a.example:443"}], f"{P}.host: invalid host 'a.example:443': not a valid IPv6 address"),
    ("host-too-broad", [{"host": "*.com"}],
     f"{P}.host: '*.com': too broad: a wildcard needs a suffix of at least two labels, as in '*.example.com'"),
    ("host-inner-star", [{"host": "a.*.example.com"}],
     f"{P}.host: 'a.*.example.com': '*' is allowed only as the whole first label, as in '*.example.com'"),
    ("host-wild-ip", [{"host": "*.192.0.2.1"}], f"{P}.host: '*.192.0.2.1': a wildcard cannot be combined with an IP address"),
    ("port-zero", [{"host": "a.example", "port": 0}], f"{P}.port: must be a number from 1 to 65535"),
    ("port-big", [{"host": "a.example", "port": 65536}], f"{P}.port: must be a number from 1 to 65535"),
    ("port-string", [{"host": "a.example", "port": "443"}], f"{P}.port: expected an integer, got a string"),
    ("port-bool", [{"host": "a.example", "port": True}], f"{P}.port: expected an integer, got a boolean"),
    ("access-unknown", [{"host": "a.example", "access": "readonly"}],
     f"{P}.access: 'readonly' is not one of read-only, read-write, full"),
    ("mode-unknown", [{"host": "a.example", "mode": "report"}], f"{P}.mode: 'report' is not one of enforce, audit"),
    ("deny-reason-blank", [{"host": "a.example", "deny_reason": " "}], f"{P}.deny_reason: must be one line of printable text"),
    ("deny-reason-lines", [{"host": "a.example", "deny_reason": "a\nb"}], f"{P}.deny_reason: must be one line of printable text"),
    ("inference-string", [{"host": "a.example", "inference": "yes"}], f"{P}.inference: expected true or false, got a string"),
    ("inference-rules", [{"host": "a.example", "inference": True, "rules": []}],
     f"{P}.rules: not allowed with inference: true (the inference router serves this host)"),
    ("inference-access", [{"host": "a.example", "access": "full", "inference": True}],
     f"{P}.access: not allowed with inference: true (the inference router serves this host)"),
    ("inference-mode", [{"host": "a.example", "inference": True, "mode": "audit"}],
     f"{P}.mode: not allowed with inference: true (the inference router serves this host)"),
    ("rules-mapping", [{"host": "a.example", "rules": {"allow": {}}}], f"{P}.rules: expected a list, got a mapping"),
    ("rule-string", [{"host": "a.example", "rules": ["allow"]}], f"{R}: expected a mapping, got a string"),
    ("rule-empty", [{"host": "a.example", "rules": [{}]}], f"{R}: expected exactly one key, allow or deny"),
    ("rule-both", [{"host": "a.example", "rules": [{"allow": {"path": "/"}, "deny": {"path": "/"}}]}],
     f"{R}: expected exactly one key, allow or deny"),
    ("rule-unknown", [{"host": "a.example", "rules": [{"permit": {}}]}], f"{R}.permit: unknown key (allowed: allow, deny)"),
    ("rule-body-list", [{"host": "a.example", "rules": [{"allow": ["GET"]}]}], f"{R}.allow: expected a mapping, got a list"),
    ("rule-body-empty", [{"host": "a.example", "rules": [{"deny": {}}]}], f"{R}.deny: needs at least one of method, path, query"),
    ("rule-body-unknown", [{"host": "a.example", "rules": [{"allow": {"paths": "/"}}]}],
     f"{R}.allow.paths: unknown key (allowed: method, path, query)"),
    ("method-number", [{"host": "a.example", "rules": [{"allow": {"method": 5}}]}],
     f"{R}.allow.method: expected a method name, a non-empty list of them or '*', got an integer"),
    ("method-empty-list", [{"host": "a.example", "rules": [{"allow": {"method": []}}]}],
     f"{R}.allow.method: expected a method name, a non-empty list of them or '*', got a list"),
    ("method-item-number", [{"host": "a.example", "rules": [{"allow": {"method": ["GET", 5]}}]}],
     f"{R}.allow.method[1]: expected a string, got an integer"),
    ("method-star-item", [{"host": "a.example", "rules": [{"allow": {"method": ["GET", "*"]}}]}],
     f"{R}.allow.method[1]: '*' must be the whole value, not a list item"),
    ("method-invalid", [{"host": "a.example", "rules": [{"allow": {"method": "GE T"}}]}],
     f"{R}.allow.method: 'GE T' is not a valid HTTP method name"),
    ("method-duplicate", [{"host": "a.example", "rules": [{"allow": {"method": ["get", "GET"]}}]}],
     f"{R}.allow.method[1]: duplicate 'GET'"),
    ("path-number", [{"host": "a.example", "rules": [{"allow": {"path": 5}}]}], f"{R}.allow.path: expected a string, got an integer"),
    ("path-relative", [{"host": "a.example", "rules": [{"allow": {"path": "gists/**"}}]}],
     f"{R}.allow.path: 'gists/**': must start with '/'"),
    ("path-dotdot", [{"host": "a.example", "rules": [{"deny": {"path": "/a/../b"}}]}],
     f"{R}.deny.path: '/a/../b': '.' or '..' segment in the path"),
    ("path-double-star", [{"host": "a.example", "rules": [{"allow": {"path": "/a**"}}]}],
     f"{R}.allow.path: '/a**': '**' must be a whole segment, as in '/a/**/b'"),
    ("path-encoded-slash", [{"host": "a.example", "rules": [{"allow": {"path": "/a%2Fb"}}]}],
     f"{R}.allow.path: '/a%2Fb': encoded '/' or a '\\' in the path"),
    ("path-bad-percent", [{"host": "a.example", "rules": [{"allow": {"path": "/100%"}}]}],
     f"{R}.allow.path: '/100%': malformed percent-encoding"),
    ("path-empty-segment", [{"host": "a.example", "rules": [{"allow": {"path": "/a//b"}}]}],
     f"{R}.allow.path: '/a//b': empty path segment ('//')"),
    ("query-list", [{"host": "a.example", "rules": [{"allow": {"query": ["a"]}}]}],
     f"{R}.allow.query: expected a non-empty mapping of parameter names to globs, got a list"),
    ("query-value-number", [{"host": "a.example", "rules": [{"allow": {"query": {"page": 1}}}]}],
     f"{R}.allow.query.page: expected a string, got an integer"),
    ("query-name-number", [{"host": "a.example", "rules": [{"allow": {"query": {1: "x"}}}]}],
     f"{R}.allow.query: parameter names must be non-empty strings"),
    ("second-entry-rule", [{"host": "a.example"}, {"host": "b.example", "rules": [{"allow": {"path": "/"}}, {"deny": {"method": []}}]}],
     "policy.intercept[1].rules[1].deny.method: expected a method name, a non-empty list of them or '*', got a list"),
    ("duplicate-entry", [{"host": "api.github.com"}, {"host": "API.GitHub.com.", "port": 443}],
     "policy.intercept[1]: api.github.com:443 is already listed in policy.intercept[0]"),
    ("duplicate-mapped", [{"host": "192.0.2.1"}, {"host": "[::ffff:192.0.2.1]"}],
     "policy.intercept[1]: 192.0.2.1:443 is already listed in policy.intercept[0]"),
    ("duplicate-wildcard", [{"host": "*.example.com", "access": "full"}, {"host": "*.EXAMPLE.com", "inference": True}],
     "policy.intercept[1]: *.example.com:443 is already listed in policy.intercept[0]"),
]


@pytest.mark.parametrize(("entries", "message"), [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES])
def test_config_errors(entries: object, message: str) -> None:
    assert _intercept_error(entries) == message


# An intercept entry that some allow entry also covers.
@pytest.mark.parametrize(
    ("host", "port", "allow", "index"),
    [
        ("api.github.com", 443, ["pypi.org:443", "api.github.com:443"], 1),
        ("api.github.com", 443, ["API.github.com.:*"], 0),
        ("api.github.com", 443, ["*.github.com:443"], 0),  # an allow wildcard covering the name
        ("*.github.com", 443, ["api.github.com:443"], 0),  # an intercept wildcard covering an allowed name
        ("*.github.com", 443, ["*.github.com:443"], 0),
        ("*.api.github.com", 443, ["*.github.com:443"], 0),  # nested wildcards share hosts
        ("*.github.com", 443, ["*.api.github.com:443"], 0),
        ("192.0.2.1", 443, ["[::ffff:192.0.2.1]:443"], 0),
        ("::ffff:192.0.2.1", 443, ["192.0.2.1:*"], 0),
        ("::1", 8443, ["[::1]:8443"], 0),
    ],
)
def test_host_both_intercepted_and_allowed_is_an_error(host: str, port: int, allow: list[str], index: int) -> None:
    entry = parse_intercept([{"host": host, "port": port}])[0]
    assert _intercept_error([{"host": host, "port": port}], allow) == (
        f"policy.intercept[0]: {entry.display} is also listed in policy.allow[{index}]"
    )


@pytest.mark.parametrize(
    ("host", "port", "allow"),
    [
        ("api.github.com", 443, ["api.github.com:80"]),
        ("github.com", 443, ["*.github.com:443"]),  # a wildcard never covers its bare suffix
        ("*.github.com", 443, ["github.com:443"]),
        ("*.github.com", 443, ["*.gitlab.com:443", "*.hub.com:443"]),
        ("192.0.2.1", 443, ["192.0.2.2:443", "ip.example:443"]),
        ("ip.example", 443, ["192.0.2.1:443"]),
    ],
)
def test_disjoint_intercept_and_allow_entries_are_fine(host: str, port: int, allow: list[str]) -> None:
    policy = parse_config({"routes": ROUTES, "policy": {"allow": allow, "intercept": [{"host": host, "port": port}]}}, ENV).policy
    assert len(policy.rules) == len(allow)
    assert len(policy.intercept) == 1


# upstream_ca
def test_upstream_ca_errors(tmp_path: Path) -> None:
    def error(path: str) -> str:
        return _intercept_error([{"host": "a.example", "upstream_ca": path}])

    missing = str(tmp_path / "missing.pem")
    assert error(missing) == f"{P}.upstream_ca: cannot read {missing!r}: No such file or directory"
    assert error(str(tmp_path)) == f"{P}.upstream_ca: {str(tmp_path)!r} is not a regular file"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block start-up
    assert error(str(fifo)) == f"{P}.upstream_ca: {str(fifo)!r} is not a regular file"
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    assert error(str(empty)) == f"{P}.upstream_ca: {str(empty)!r} holds no valid PEM certificate"
    key = tmp_path / "key.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert error(str(key)) == f"{P}.upstream_ca: {str(key)!r} holds no valid PEM certificate"
    broken = tmp_path / "broken.pem"
    broken.write_bytes(_pem_certificate().replace(b"M", b"!", 3))
    assert error(str(broken)) == f"{P}.upstream_ca: {str(broken)!r} holds no valid PEM certificate"
    big = tmp_path / "big.pem"
    big.write_bytes(_pem_certificate() + b"\n" * (4 * 1024 * 1024))
    assert error(str(big)) == f"{P}.upstream_ca: {str(big)!r} is larger than 4 MiB"
    assert _intercept_error([{"host": "a.example", "upstream_ca": 5}]) == f"{P}.upstream_ca: expected a string, got an integer"


def test_upstream_ca_path_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ca.pem").write_bytes(_pem_certificate())
    (entry,) = parse_intercept([{"host": "a.example", "upstream_ca": "~/ca.pem"}])
    assert entry.upstream_ca == "~/ca.pem"
    assert len(entry.upstream_ca_certs) == 1


def test_parse_intercept_names_the_given_path() -> None:
    with pytest.raises(ValueError, match=r"^x\.y\[0\]\.port: must be a number from 1 to 65535$"):
        parse_intercept([{"host": "a.example", "port": 0}], "x.y")


# Top-level keys.
@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"ca_name_constraints": "no"}, "ca_name_constraints: expected true or false, got a string"),
        ({"ca_name_constraints": 0}, "ca_name_constraints: expected true or false, got an integer"),
        ({"audit_log": ""}, "audit_log: must not be empty"),
        ({"audit_log": ["a"]}, "audit_log: expected a string, got a list"),
    ],
)
def test_top_level_key_errors(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"routes": ROUTES, **document}, ENV)
    assert str(info.value) == message
