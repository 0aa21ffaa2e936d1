"""Tests for navtwist.intercept.credentials: config, placeholders and their shapes, injection, refusal, rotation."""
from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from navtwist.intercept import credentials as creds
from navtwist.secret import MAX_SECRET_FILE_BYTES
from navtwist.intercept.credentials import (
    Binding,
    Credential,
    CredentialError,
    CredentialSet,
    Mismatch,
    Rewrite,
    canonical_path,
    check_bound,
    load_or_create_seed,
    make_placeholder,
    parse_credentials,
    skeleton,
)

SEED = bytes(range(32))
GITHUB_SECRET = "ghp_" + "Zx9Qw3Er5Ty7Ui1Op2As4Df6Gh8Jk0LzXcVb"  # 40 characters
ENV = {"GITHUB_TOKEN_REAL": GITHUB_SECRET}


def github(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "env": "GITHUB_TOKEN_REAL",
        "sandbox_env": "GITHUB_TOKEN",
        "hosts": ["api.github.com:443", "github.com:443/acme/"],
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


def make_set(raw: dict[str, Any], environ: dict[str, str] = ENV, seed: bytes = SEED) -> CredentialSet:
    return CredentialSet.create(parse_credentials(raw, environ), seed)


@pytest.fixture
def two() -> CredentialSet:
    """github (api.github.com, github.com/acme) and slack (slack.com), with their placeholders."""
    environ = {**ENV, "SLACK_REAL": "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"}
    slack = {"env": "SLACK_REAL", "sandbox_env": "SLACK_BOT_TOKEN", "hosts": ["slack.com"]}
    return make_set({"github": github(), "slack": slack}, environ)


def placeholder(cs: CredentialSet, variable: str = "GITHUB_TOKEN") -> bytes:
    return cs.env_variables()[variable].encode()


# --- configuration -------------------------------------------------------------------


def test_parse_reads_the_secret_and_bindings() -> None:
    (credential,) = parse_credentials({"github": github()}, ENV)
    assert credential.name == "github"
    assert (credential.source, credential.location, credential.sandbox_env) == ("env", "GITHUB_TOKEN_REAL", "GITHUB_TOKEN")
    assert credential.secret == GITHUB_SECRET
    assert credential.hosts == (Binding("api.github.com", 443), Binding("github.com", 443, b"/acme"))
    assert credential.kept_because is None


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("API.GitHub.com.", Binding("api.github.com", 443)),
        ("example.com:8443", Binding("example.com", 8443)),
        ("example.com/org", Binding("example.com", 443, b"/org")),
        ("example.com/org/", Binding("example.com", 443, b"/org")),
        ("example.com:8443/a/b/", Binding("example.com", 8443, b"/a/b")),
        ("example.com/", Binding("example.com", 443)),
        ("10.0.0.1:80", Binding("10.0.0.1", 80)),
        ("[::1]:8443/x", Binding("::1", 8443, b"/x")),
        ("[2001:DB8::1]", Binding("2001:db8::1", 443)),
        ("bücher.example", Binding("xn--bcher-kva.example", 443)),
    ],
)
def test_binding_forms(entry: str, expected: Binding) -> None:
    (credential,) = parse_credentials({"c": github(hosts=[entry])}, ENV)
    assert credential.hosts == (expected,)


def test_secret_from_file_strips_the_final_newline(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text(GITHUB_SECRET + "\n")
    (credential,) = parse_credentials({"github": github(env=None, file=str(secret_file))}, {})
    assert (credential.source, credential.location, credential.secret) == ("file", str(secret_file), GITHUB_SECRET)


def test_absent_section_is_empty() -> None:
    assert parse_credentials(None, ENV) == ()
    assert parse_credentials({}, ENV) == ()


@pytest.mark.parametrize(
    "raw, message",
    [
        ([], "credentials: expected a mapping of names to credentials, got a list"),
        ({"github": "x"}, "credentials.github: expected a mapping, got a string"),
        ({"bad name": github()}, "credentials.bad name: a credential name is 1-64"),
        ({"-x": github()}, "credentials.-x: a credential name"),
        ({1: github()}, "credentials.1: a credential name"),
        ({"github": github(token="x")}, "credentials.github.token: unknown key (allowed: env, file, sandbox_env, hosts)"),
        ({"github": github(file="/x")}, "credentials.github: set exactly one of env and file"),
        ({"github": github(env=None)}, "credentials.github: set exactly one of env and file"),
        ({"github": github(env=5)}, "credentials.github.env: expected a string, got an integer"),
        ({"github": github(sandbox_env=None)}, "credentials.github.sandbox_env: required key is missing"),
        ({"github": github(sandbox_env="GITHUB-TOKEN")}, "credentials.github.sandbox_env: 'GITHUB-TOKEN' is not a valid shell variable name"),
        ({"github": github(sandbox_env="1X")}, "credentials.github.sandbox_env: '1X' is not a valid shell variable name"),
        ({"a": github(), "b": github()}, "credentials.b.sandbox_env: GITHUB_TOKEN is already the sandbox_env of credentials.a"),
        ({"github": github(hosts=None)}, "credentials.github.hosts: expected a non-empty list"),
        ({"github": github(hosts=[])}, "credentials.github.hosts: expected a non-empty list"),
        ({"github": github(hosts="api.github.com")}, "credentials.github.hosts: expected a non-empty list"),
        ({"github": github(hosts=[443])}, "credentials.github.hosts[0]: expected a string like 'api.github.com:443', got an integer"),
        ({"github": github(hosts=["a.com", "exa mple.com"])}, "credentials.github.hosts[1]: invalid host 'exa mple.com'"),
        ({"github": github(hosts=["127.1"])}, "credentials.github.hosts[0]: invalid host '127.1': ambiguous IP address form"),
        ({"github": github(hosts=["*.github.com"])}, "credentials.github.hosts[0]: '*.github.com': a credential is bound to exact hosts"),
        ({"github": github(hosts=["::1:443"])}, "credentials.github.hosts[0]: '::1:443': write an IPv6 address in brackets"),
        ({"github": github(hosts=["[::1"])}, "credentials.github.hosts[0]: '[::1': unterminated '['"),
        ({"github": github(hosts=["[::1]x"])}, "credentials.github.hosts[0]: '[::1]x': expected ':port' or '/path'"),
        ({"github": github(hosts=["[::1]:"])}, "credentials.github.hosts[0]: '[::1]:': empty port"),
        ({"github": github(hosts=["[1.2.3.4]"])}, "credentials.github.hosts[0]: invalid host '[1.2.3.4]': not a valid IPv6 address"),
        ({"github": github(hosts=["a.com:"])}, "credentials.github.hosts[0]: 'a.com:': empty port"),
        ({"github": github(hosts=["a.com:0"])}, "credentials.github.hosts[0]: 'a.com:0': port must be a number from 1 to 65535"),
        ({"github": github(hosts=["a.com:65536"])}, "port must be a number from 1 to 65535"),
        ({"github": github(hosts=["a.com:https"])}, "port must be a number from 1 to 65535"),
        ({"github": github(hosts=["a.com/x?y"])}, "credentials.github.hosts[0]: 'a.com/x?y': the path prefix must be printable ASCII"),
        ({"github": github(hosts=["a.com/x%2F"])}, "the path prefix must be printable ASCII"),
        ({"github": github(hosts=["a.com/x y"])}, "the path prefix must be printable ASCII"),
        ({"github": github(hosts=["a.com/a/../b"])}, "credentials.github.hosts[0]: 'a.com/a/../b': the path prefix has an empty, '.' or '..' segment"),
        ({"github": github(hosts=["a.com//b"])}, "the path prefix has an empty"),
        ({"github": github(hosts=["a.com", "A.com:443"])}, "credentials.github.hosts[1]: duplicate a.com:443"),
    ],
)
def test_config_errors_name_the_key_path(raw: object, message: str) -> None:
    with pytest.raises(CredentialError) as info:
        parse_credentials(raw, ENV)
    text = str(info.value)
    assert text.startswith(message) or message in text
    assert "\n" not in text
    assert GITHUB_SECRET not in text


@pytest.mark.parametrize(
    "environ, message",
    [
        ({}, "credentials.github: secret from env GITHUB_TOKEN_REAL is not set"),
        ({"GITHUB_TOKEN_REAL": ""}, "credentials.github: secret from env GITHUB_TOKEN_REAL is empty"),
        ({"GITHUB_TOKEN_REAL": " \n"}, "credentials.github: secret from env GITHUB_TOKEN_REAL is empty"),
        ({"GITHUB_TOKEN_REAL": "ghp_abc\r\nX-Evil: 1"}, "credentials.github: secret from env GITHUB_TOKEN_REAL contains whitespace, control or non-ASCII characters"),
        ({"GITHUB_TOKEN_REAL": "tökensecret"}, "credentials.github: secret from env GITHUB_TOKEN_REAL contains whitespace, control or non-ASCII characters"),
    ],
)
def test_unusable_secret_is_an_error_naming_the_credential_not_the_value(environ: dict[str, str], message: str) -> None:
    with pytest.raises(CredentialError) as info:
        parse_credentials({"github": github()}, environ)
    assert str(info.value) == message
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot be read: No such file or directory"),
        (b"", "is empty"),
        (b"\n\n", "is empty"),
        (b"ghp_\xc3\xa9secretvalue", "contains whitespace, control or non-ASCII characters"),
        (b"x" * (MAX_SECRET_FILE_BYTES + 1), f"is larger than {MAX_SECRET_FILE_BYTES} bytes"),
    ],
)
def test_unusable_secret_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    secret_file = tmp_path / "token"
    if content is not None:
        secret_file.write_bytes(content)
    with pytest.raises(CredentialError) as info:
        parse_credentials({"github": github(env=None, file=str(secret_file))}, {})
    assert str(info.value) == f"credentials.github: secret from file {secret_file} {message}"


def test_previous_value_kept_when_the_secret_became_unreadable() -> None:
    (old,) = parse_credentials({"github": github()}, ENV)
    (new,) = parse_credentials({"github": github()}, {}, previous=[old])
    assert new.secret == GITHUB_SECRET
    assert new.kept_because == "credentials.github: secret from env GITHUB_TOKEN_REAL is not set; keeping the previous value"


def test_previous_value_not_kept_when_the_source_changed() -> None:
    (old,) = parse_credentials({"github": github()}, ENV)
    with pytest.raises(CredentialError, match="secret from env OTHER is not set"):
        parse_credentials({"github": github(env="OTHER")}, ENV, previous=[old])


# --- binding to intercept entries -----------------------------------------------------


def test_check_bound_accepts_exact_wildcard_and_ip_entries() -> None:
    bound = parse_credentials(
        {"c": github(hosts=["api.github.com", "uploads.github.com:8443", "[::1]:9000/x", "10.1.2.3:80"])}, ENV
    )
    check_bound(bound, [("api.github.com", 443), ("*.github.com", 8443), ("::1", 9000), ("10.1.2.3", 80)])


@pytest.mark.parametrize(
    "intercept",
    [
        [("api.github.com", 443)],  # github.com missing
        [("api.github.com", 443), ("github.com", 8443)],  # wrong port
        [("api.github.com", 443), ("*.github.com", 443)],  # a wildcard never covers the bare suffix
    ],
)
def test_check_bound_refuses_a_host_that_is_not_intercepted(intercept: list[tuple[str, int]]) -> None:
    credentials = parse_credentials({"github": github()}, ENV)
    with pytest.raises(CredentialError) as info:
        check_bound(credentials, intercept)
    assert str(info.value) == (
        "credentials.github.hosts[1]: github.com:443 is not an intercept entry (policy.intercept); "
        "a tunnel is opaque: the placeholder would leave verbatim"
    )


# --- the seed ------------------------------------------------------------------------


def test_seed_is_created_once_0600_and_then_read(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    seed = load_or_create_seed(ca_dir)
    path = ca_dir / "placeholder.key"
    assert len(seed) == 32 and path.read_bytes() == seed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_dir.stat().st_mode) & 0o077 == 0
    assert load_or_create_seed(ca_dir) == seed
    assert sorted(p.name for p in ca_dir.iterdir()) == ["placeholder.key"]  # no temporary file left


def test_seed_created_concurrently_by_another_process_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = b"\x07" * 32
    real_link = os.link

    def racing_link(source: Any, target: Any) -> None:
        Path(target).write_bytes(theirs)  # another process got there first
        real_link(source, target)

    monkeypatch.setattr(creds.os, "link", racing_link)
    assert load_or_create_seed(tmp_path) == theirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placeholder.key"]


def test_seed_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / "placeholder.key").write_bytes(b"short")
    with pytest.raises(CredentialError, match=r"placeholder.key must hold exactly 32 bytes; remove it"):
        load_or_create_seed(tmp_path)


def test_seed_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CredentialError, match=r"^cannot read .*/file/ca/placeholder.key: Not a directory$"):
        load_or_create_seed(blocker / "ca")


# --- placeholder shapes ---------------------------------------------------------------

ALNUM = "[A-Za-z0-9]"
SHAPED = [
    # (secret, the placeholder's pattern)
    ("ghp_" + "a1B2c3D4e5" * 3 + "F6g7H8", rf"ghp_{ALNUM}{{36}}"),
    ("gho_" + "a1B2c3D4e5" * 3 + "F6g7H8", rf"gho_{ALNUM}{{36}}"),
    ("ghu_" + "a1B2c3D4e5" * 3 + "F6g7H8", rf"ghu_{ALNUM}{{36}}"),
    ("ghs_" + "a1B2c3D4e5" * 3 + "F6g7H8", rf"ghs_{ALNUM}{{36}}"),
    ("ghr_" + "a1B2c3D4e5" * 3 + "F6g7H8", rf"ghr_{ALNUM}{{36}}"),
    ("github_pat_" + "11ABCDEFG0" * 2 + "xy" + "_" + "aB3dE6gH9j" * 5 + "kLmNoPqRs", rf"github_pat_{ALNUM}{{22}}_{ALNUM}{{59}}"),
    ("sk-ant-api03-" + "Ab_3-fG7hJ" * 9 + "kLmNo" + "AA", rf"sk-ant-api03-{ALNUM}{{97}}"),
    ("sk-ant-admin01-" + "Ab_3-fG7hJ" * 9 + "kLmNoAA", rf"sk-ant-admin01-{ALNUM}{{97}}"),
    ("sk-proj-" + "Ab_3-fG7hJ" * 15 + "T3BlbkFJ", rf"sk-proj-{ALNUM}{{158}}"),
    ("sk-" + "aB3dE6gH9j" * 4 + "T3BlbkFJ", rf"sk-{ALNUM}{{48}}"),
    ("sk-" + "0123456789abcdef" * 2, r"sk-[0-9a-f]{32}"),  # DeepSeek: lower-case hex stays hex
    ("sk_live_" + "aB3dE6gH9j" * 10, rf"sk_live_{ALNUM}{{100}}"),
    ("xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", rf"xoxb-[0-9]{{12}}-[0-9]{{13}}-{ALNUM}{{24}}"),
    ("xoxp-1234567890-1234567890-1234567890123-" + "0123456789abcdef" * 2, r"xoxp-[0-9]{10}-[0-9]{10}-[0-9]{13}-[0-9a-f]{32}"),
    ("xapp-1-A0123456789-1234567890123-" + "0123456789abcdef" * 4, r"xapp-[0-9]-[A-Za-z0-9]{11}-[0-9]{13}-[0-9a-f]{64}"),
    ("glpat-" + "aB3dE6gH9j-k_mN0pQrS", rf"glpat-{ALNUM}{{20}}"),
    ("npm_" + "aB3dE6gH9j" * 3 + "kLmNoP", rf"npm_{ALNUM}{{36}}"),
    ("pypi-AgEIcHlwaS5vcmcCJ" + "Ab_3-fG7hJ" * 10, rf"pypi-{ALNUM}{{117}}"),
    ("hf_" + "AbCdEfGhIj" * 3 + "KlMn", r"hf_[A-Za-z]{34}"),
    ("nvapi-" + "Ab_3-fG7hJ" * 6 + "kLmN", rf"nvapi-{ALNUM}{{64}}"),
    ("AIza" + "Sy" + "Ab_3-fG7hJ" * 3 + "kLm", rf"AIza{ALNUM}{{35}}"),
    ("AKIA" + "IOSFODNN7EXAMPLE", r"AKIA[A-Z0-9]{16}"),
    ("ASIA" + "IOSFODNN7EXAMPLE", r"ASIA[A-Z0-9]{16}"),
]


@pytest.mark.parametrize("secret, pattern", SHAPED)
def test_placeholder_has_the_shape_of_the_secret(secret: str, pattern: str) -> None:
    made = make_placeholder(SEED, "c", secret)
    assert re.fullmatch(pattern, made), made
    assert len(made) == len(secret)
    assert made != secret
    prefix = pattern.split("[", 1)[0]
    assert secret.startswith(prefix) and len(prefix) >= 3


@pytest.mark.parametrize(
    "secret",
    ["xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "github_pat_" + "A" * 22 + "_" + "b" * 59],
)
def test_structured_placeholder_keeps_separator_positions(secret: str) -> None:
    made = make_placeholder(SEED, "c", secret)
    assert [i for i, ch in enumerate(made) if ch in "-_"] == [i for i, ch in enumerate(secret) if ch in "-_"]


def test_alphanumeric_body_gives_an_alphanumeric_placeholder_for_many_seeds() -> None:
    # The body of a base64url-format secret may hold '-' and '_'; the
    # placeholder keeps to the alphanumeric subset every validator accepts.
    for i in range(50):
        made = make_placeholder(bytes([i]) * 32, "c", "sk-proj-" + "Ab_3-fG7hJ" * 15)
        assert re.fullmatch(rf"sk-proj-{ALNUM}{{150}}", made)


@pytest.mark.parametrize(
    "secret",
    [
        "0123456789abcdef0123456789abcdef01234567",  # unknown format
        "ghp_short",  # a known prefix, too few random characters to hide in
        "AKIA" + "IOSFODNN7EXAMPL",  # AWS key ids are exactly 20 characters
        "ghp_" + "a1B2c3D4e5" * 3 + "F6g7H-",  # a character the format does not have
        "s3cr3t/with+url=chars&more",
    ],
)
def test_unknown_shape_gives_a_generic_placeholder(secret: str) -> None:
    assert skeleton(secret) is None
    made = make_placeholder(SEED, "github", secret)
    assert re.fullmatch(r"navtwist-ph-github-[A-Za-z0-9]{32}", made)


def test_placeholder_is_stable_and_depends_on_seed_name_and_shape_only() -> None:
    secret = SHAPED[0][0]
    rotated = "ghp_" + "Q" * 36  # another secret of the same shape
    first = make_placeholder(SEED, "github", secret)
    assert make_placeholder(SEED, "github", secret) == first
    assert make_placeholder(SEED, "github", rotated) == first
    assert make_placeholder(bytes(32), "github", secret) != first
    assert make_placeholder(SEED, "gitlab", secret) != first
    # Another length is another shape, derived afresh: not the same characters, one more.
    assert not make_placeholder(SEED, "github", secret + "x").startswith(first)
    assert make_placeholder(SEED, "github", "gho_" + secret[4:]) != first


def test_generic_placeholder_is_stable_across_rotation() -> None:
    assert make_placeholder(SEED, "db", "hunter2-long-password") == make_placeholder(SEED, "db", "another-secret!")


def test_placeholder_is_never_the_secret() -> None:
    # A secret that happens to equal the placeholder its shape would get.
    unlucky = make_placeholder(SEED, "github", SHAPED[0][0])
    made = make_placeholder(SEED, "github", unlucky)
    assert made != unlucky
    assert re.fullmatch(rf"ghp_{ALNUM}{{36}}", made)


def test_placeholder_characters_are_spread_over_the_alphabet() -> None:
    # Rejection sampling: every character of the alphabet is reachable.
    seen = set("".join(make_placeholder(bytes([i]) * 32, "c", "sk-" + "0123456789abcdef" * 2)[3:] for i in range(20)))
    assert seen == set("0123456789abcdef")


# --- injection -----------------------------------------------------------------------


def test_bearer_header_gets_the_secret(two: CredentialSet) -> None:
    ph = placeholder(two)
    headers = [(b"accept", b"*/*"), (b"authorization", b"Bearer " + ph)]
    result = two.rewrite("api.github.com", 443, b"/user", headers)
    assert isinstance(result, Rewrite)
    assert result.headers == [(b"accept", b"*/*"), (b"authorization", b"Bearer " + GITHUB_SECRET.encode())]
    assert result.target == b"/user"
    assert result.credentials == ("github",)
    assert headers[1][1] == b"Bearer " + ph  # the caller's list is not changed


def test_exact_header_value_and_repeated_occurrences(two: CredentialSet) -> None:
    ph = placeholder(two)
    result = two.rewrite("api.github.com", 443, b"/", [(b"x-token", ph), (b"x-two", ph + b"," + ph)])
    assert isinstance(result, Rewrite)
    secret = GITHUB_SECRET.encode()
    assert result.headers == [(b"x-token", secret), (b"x-two", secret + b"," + secret)]


@pytest.mark.parametrize("scheme", [b"Basic ", b"basic ", b"BASIC  "])
@pytest.mark.parametrize("userinfo", [b"x-access-token:%s", b"%s:x-oauth-basic", b"%s:%s"])
def test_basic_credentials_are_decoded_replaced_and_re_encoded(two: CredentialSet, scheme: bytes, userinfo: bytes) -> None:
    ph = placeholder(two)
    count = userinfo.count(b"%s")
    value = scheme + base64.b64encode(userinfo % ((ph,) * count))
    result = two.rewrite("github.com", 443, b"/acme/repo.git/info/refs?service=git-upload-pack", [(b"authorization", value)])
    assert isinstance(result, Rewrite)
    ((_, new),) = result.headers
    assert new.startswith(scheme)
    assert base64.b64decode(new[len(scheme):], validate=True) == userinfo % ((GITHUB_SECRET.encode(),) * count)
    assert result.credentials == ("github",)


def test_query_value_and_path_segment(two: CredentialSet) -> None:
    ph = placeholder(two)
    secret = GITHUB_SECRET.encode()
    result = two.rewrite("api.github.com", 443, b"/t/" + ph + b"/x?access_token=" + ph + b"&a=1", [])
    assert isinstance(result, Rewrite)
    assert result.target == b"/t/" + secret + b"/x?access_token=" + secret + b"&a=1"
    assert result.credentials == ("github",)


@pytest.mark.parametrize("encode", ["all-upper", "all-lower", "one"])
def test_percent_encoded_placeholder_in_the_target_is_found(two: CredentialSet, encode: str) -> None:
    ph = placeholder(two)
    if encode == "one":
        encoded = b"%" + b"%02X" % ph[0] + ph[1:]
    else:
        encoded = b"".join(b"%%%02X" % c for c in ph)
        encoded = encoded.lower() if encode == "all-lower" else encoded
    result = two.rewrite("api.github.com", 443, b"/x?t=" + encoded, [])
    assert isinstance(result, Rewrite)
    assert result.target == b"/x?t=" + GITHUB_SECRET.encode()
    refused = two.rewrite("example.com", 443, b"/" + encoded, [])
    assert refused == Mismatch("github", "credential github is not bound to example.com:443")


def test_secret_is_percent_encoded_in_the_target_and_raw_in_headers() -> None:
    secret = "s3cr3t/with+url=chars&more%"
    cs = make_set({"db": {"env": "S", "sandbox_env": "DB", "hosts": ["db.example"]}}, {"S": secret})
    ph = placeholder(cs, "DB")
    result = cs.rewrite("db.example", 443, b"/q?key=" + ph, [(b"x-key", ph)])
    assert isinstance(result, Rewrite)
    assert result.target == b"/q?key=s3cr3t%2Fwith%2Burl%3Dchars%26more%25"
    assert result.headers == [(b"x-key", secret.encode())]


def test_request_without_placeholder_is_returned_unchanged(two: CredentialSet) -> None:
    headers = [(b"authorization", b"Bearer something-else"), (b"authorization", b"Basic " + base64.b64encode(b"a:b"))]
    target = b"/x?y=%41"
    result = two.rewrite("elsewhere.example", 443, target, headers)
    assert isinstance(result, Rewrite)
    assert result.target is target and result.headers is headers and result.credentials == ()


def test_empty_set_rewrites_nothing() -> None:
    cs = CredentialSet.create((), SEED)
    headers = [(b"a", b"b")]
    assert cs.rewrite("x", 443, b"/", headers) == Rewrite(b"/", headers, ())
    assert cs.contains_placeholder(b"anything") is None
    assert cs.redact(b"/p") == b"/p"
    assert cs.env_variables() == {}


def test_two_credentials_on_one_endpoint() -> None:
    environ = {**ENV, "NPM": "npm_" + "aB3dE6gH9j" * 3 + "kLmNoP"}
    cs = make_set(
        {
            "github": github(hosts=["registry.example"]),
            "npm": {"env": "NPM", "sandbox_env": "NPM_TOKEN", "hosts": ["registry.example"]},
        },
        environ,
    )
    result = cs.rewrite(
        "registry.example", 443, b"/", [(b"a", placeholder(cs, "NPM_TOKEN")), (b"b", placeholder(cs))]
    )
    assert isinstance(result, Rewrite)
    assert result.headers == [(b"a", environ["NPM"].encode()), (b"b", GITHUB_SECRET.encode())]
    assert result.credentials == ("github", "npm")


def test_host_is_compared_in_normal_form(two: CredentialSet) -> None:
    result = two.rewrite("API.GitHub.com.", 443, b"/", [(b"authorization", b"Bearer " + placeholder(two))])
    assert isinstance(result, Rewrite) and result.credentials == ("github",)


def test_ipv6_binding() -> None:
    cs = make_set({"c": github(hosts=["[::1]:8443"])})
    assert isinstance(cs.rewrite("::1", 8443, b"/", [(b"x", placeholder(cs))]), Rewrite)
    assert isinstance(cs.rewrite("[::1]", 8443, b"/", [(b"x", placeholder(cs))]), Rewrite)
    assert cs.rewrite("::2", 8443, b"/", [(b"x", placeholder(cs))]) == Mismatch("c", "credential c is not bound to [::2]:8443")


# --- refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, port, target, headers",
    [
        ("example.com", 443, b"/", [(b"authorization", b"Bearer %s")]),
        ("api.github.com", 8443, b"/", [(b"authorization", b"Bearer %s")]),
        ("example.com", 443, b"/", [(b"host", b"%s.example.com")]),
        ("example.com", 443, b"/", [(b"proxy-authorization", b"Basic %s")]),
        ("example.com", 443, b"/", [(b"cookie", b"a=1; t=%s")]),
        ("example.com", 443, b"/?token=%s", []),
        ("example.com", 443, b"/%s/x", []),
        ("not a host", 443, b"/", [(b"x", b"%s")]),
    ],
)
def test_placeholder_sent_to_an_unbound_endpoint_is_refused(
    two: CredentialSet, host: str, port: int, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    ph = placeholder(two)
    result = two.rewrite(host, port, target.replace(b"%s", ph), [(n, v.replace(b"%s", ph)) for n, v in headers])
    assert isinstance(result, Mismatch)
    assert result.credential == "github"
    assert ph.decode() not in result.detail and GITHUB_SECRET not in result.detail


def test_basic_placeholder_to_an_unbound_endpoint_is_refused(two: CredentialSet) -> None:
    value = b"Basic " + base64.b64encode(b"x-access-token:" + placeholder(two))
    assert two.rewrite("gitlab.com", 443, b"/", [(b"authorization", value)]) == Mismatch(
        "github", "credential github is not bound to gitlab.com:443"
    )


def test_one_unbound_placeholder_refuses_the_whole_request(two: CredentialSet) -> None:
    headers = [(b"authorization", b"Bearer " + placeholder(two)), (b"x-slack", placeholder(two, "SLACK_BOT_TOKEN"))]
    assert two.rewrite("api.github.com", 443, b"/", headers) == Mismatch(
        "slack", "credential slack is not bound to api.github.com:443"
    )


def test_placeholder_in_a_header_name_is_refused_even_when_bound(two: CredentialSet) -> None:
    result = two.rewrite("api.github.com", 443, b"/", [(b"x-" + placeholder(two), b"1")])
    assert isinstance(result, Mismatch) and result.credential == "github"


@pytest.mark.parametrize(
    "target, allowed",
    [
        (b"/acme", True),
        (b"/acme/", True),
        (b"/acme/repo.git/info/refs?service=git-upload-pack", True),
        (b"/%61cme/repo", True),  # an encoded letter is the same path
        (b"/acmex/repo", False),
        (b"/other/repo", False),
        (b"/ACME/repo", False),  # compared exactly: refused rather than guessed
        (b"//acme/repo", False),
        (b"/acme/../other/repo", False),
        (b"/acme/%2e%2e/other/repo", False),
        (b"/acme/..;/other/repo", False),
        (b"/acme/./repo", False),
        (b"/acme%2f..%2fother/repo", False),
        (b"/acme/..%5cother", False),
        (b"/acme\\..\\other", False),
        (b"/acme/%252e%252e/other", False),
        (b"*", False),
        (b"https://github.com/acme/repo", False),
    ],
)
def test_path_prefix_binding(two: CredentialSet, target: bytes, allowed: bool) -> None:
    result = two.rewrite("github.com", 443, target, [(b"authorization", b"Bearer " + placeholder(two))])
    if allowed:
        assert isinstance(result, Rewrite) and result.credentials == ("github",)
    else:
        assert result == Mismatch("github", "credential github is not bound to github.com:443 at this path")


@pytest.mark.parametrize(
    "path, expected",
    [
        (b"/a/b", b"/a/b"),
        (b"/a%20b", b"/a b"),
        (b"/a/.hidden/..x", b"/a/.hidden/..x"),
        (b"/a/../b", None),
        (b"/a/%2E", None),
        (b"/a%2Fb", None),
        (b"/a%25", None),
        (b"a/b", None),
    ],
)
def test_canonical_path(path: bytes, expected: bytes | None) -> None:
    assert canonical_path(path) == expected


# --- clear-text requests, logs, navtwist env ---------------------------------------------


def test_contains_placeholder_in_any_form(two: CredentialSet) -> None:
    ph = placeholder(two)
    assert two.contains_placeholder(b"GET http://x.example/?t=" + ph + b" HTTP/1.1") == "github"
    assert two.contains_placeholder(b"http://x.example/" + b"".join(b"%%%02x" % c for c in ph)) == "github"
    head = b"GET http://x/ HTTP/1.1\r\nAuthorization: basic " + base64.b64encode(b"u:" + placeholder(two, "SLACK_BOT_TOKEN")) + b"\r\n\r\n"
    assert two.contains_placeholder(head) == "slack"
    assert two.contains_placeholder(b"GET http://x/ HTTP/1.1\r\nAuthorization: Basic dTpw\r\n") is None
    assert two.contains_placeholder(b"GET http://x/?t=" + ph[:-1] + b" HTTP/1.1") is None


def test_redact_names_the_credential_instead_of_the_placeholder(two: CredentialSet) -> None:
    ph = placeholder(two)
    encoded = b"".join(b"%%%02X" % c for c in ph)
    assert two.redact(b"/t/" + ph + b"?a=" + encoded) == b"/t/[credential:github]?a=[credential:github]"


def test_env_variables_in_config_order(two: CredentialSet) -> None:
    variables = two.env_variables()
    assert list(variables) == ["GITHUB_TOKEN", "SLACK_BOT_TOKEN"]
    assert variables["GITHUB_TOKEN"] == make_placeholder(SEED, "github", GITHUB_SECRET)


def test_placeholders_are_the_same_after_a_restart(tmp_path: Path) -> None:
    first = make_set({"github": github()}, seed=load_or_create_seed(tmp_path))
    again = make_set({"github": github()}, seed=load_or_create_seed(tmp_path))
    assert first.env_variables() == again.env_variables()


# --- rotation ------------------------------------------------------------------------


@pytest.fixture
def from_file(tmp_path: Path) -> tuple[CredentialSet, Path]:
    secret_file = tmp_path / "token"
    secret_file.write_text(GITHUB_SECRET + "\n")
    return make_set({"github": github(env=None, file=str(secret_file))}, {}), secret_file


def bearer_secret(cs: CredentialSet) -> bytes:
    result = cs.rewrite("api.github.com", 443, b"/", [(b"authorization", b"Bearer " + placeholder(cs))])
    assert isinstance(result, Rewrite)
    return result.headers[0][1][len(b"Bearer "):]


def test_reload_uses_the_rotated_secret_behind_the_same_placeholder(from_file: tuple[CredentialSet, Path]) -> None:
    cs, secret_file = from_file
    rotated = "ghp_" + "R" * 36
    secret_file.write_text(rotated)
    new, warnings = cs.reload({})
    assert warnings == []
    assert new.env_variables() == cs.env_variables()
    assert bearer_secret(new) == rotated.encode()
    assert bearer_secret(cs) == GITHUB_SECRET.encode()  # the old snapshot is untouched
    assert new.files == (str(secret_file),)


@pytest.mark.parametrize("break_it", ["empty", "missing"])
def test_reload_keeps_the_old_secret_when_the_new_one_is_unusable(from_file: tuple[CredentialSet, Path], break_it: str) -> None:
    cs, secret_file = from_file
    if break_it == "empty":
        secret_file.write_text("")
    else:
        secret_file.unlink()
    new, warnings = cs.reload({})
    why = "is empty" if break_it == "empty" else "cannot be read: No such file or directory"
    assert warnings == [f"credentials.github: secret from file {secret_file} {why}; keeping the previous value"]
    assert bearer_secret(new) == GITHUB_SECRET.encode()
    assert new.env_variables() == cs.env_variables()
    # Once the file is good again, the next reload uses it and stops warning.
    secret_file.write_text("ghp_" + "S" * 36)
    newer, warnings = new.reload({})
    assert warnings == [] and bearer_secret(newer) == b"ghp_" + b"S" * 36


def test_reload_to_another_shape_keeps_the_placeholder_and_warns(from_file: tuple[CredentialSet, Path]) -> None:
    cs, secret_file = from_file
    fine_grained = "github_pat_" + "A" * 22 + "_" + "b" * 59
    secret_file.write_text(fine_grained)
    new, warnings = cs.reload({})
    assert new.env_variables() == cs.env_variables()
    assert bearer_secret(new) == fine_grained.encode()
    assert warnings == [
        "credentials.github: the new secret has another format; the sandbox's placeholder stays until "
        "navtwist restarts, then `navtwist env` gives a new one"
    ]
    assert CredentialSet.create(new.credentials, SEED).env_variables() != cs.env_variables()


def test_updated_config_keeps_placeholders_by_name_and_derives_new_ones() -> None:
    cs = make_set({"github": github()})
    environ = {**ENV, "NPM": "npm_" + "aB3dE6gH9j" * 3 + "kLmNoP"}
    config = parse_credentials(
        {"github": github(hosts=["api.github.com"]), "npm": {"env": "NPM", "sandbox_env": "NPM_TOKEN", "hosts": ["registry.npmjs.org"]}},
        environ,
        previous=cs.credentials,
    )
    new, warnings = cs.updated(config)
    assert warnings == []
    assert new.env_variables()["GITHUB_TOKEN"] == cs.env_variables()["GITHUB_TOKEN"]
    assert new.env_variables()["NPM_TOKEN"] == make_placeholder(SEED, "npm", environ["NPM"])
    # The narrowed binding applies at once.
    assert isinstance(new.rewrite("github.com", 443, b"/acme/x", [(b"x", placeholder(new))]), Mismatch)


def test_updated_reports_kept_secrets() -> None:
    cs = make_set({"github": github()})
    config = parse_credentials({"github": github()}, {}, previous=cs.credentials)
    new, warnings = cs.updated(config)
    assert warnings == ["credentials.github: secret from env GITHUB_TOKEN_REAL is not set; keeping the previous value"]
    assert bearer_secret(new) == GITHUB_SECRET.encode()


# --- secrets stay out of reprs -----------------------------------------------------------


def test_no_secret_in_any_repr(two: CredentialSet) -> None:
    ph = placeholder(two)
    rewritten = two.rewrite("api.github.com", 443, b"/?t=" + ph, [(b"authorization", b"Bearer " + ph)])
    objects: list[object] = [two, *two.credentials, rewritten, *two._entries]
    for obj in objects:
        for text in (repr(obj), str(obj)):
            assert GITHUB_SECRET not in text and ph.decode() not in text, text
    assert "github" in repr(two)


def test_credential_equality_covers_the_secret() -> None:
    (a,) = parse_credentials({"github": github()}, ENV)
    (b,) = parse_credentials({"github": github()}, {"GITHUB_TOKEN_REAL": "ghp_" + "Q" * 36})
    assert a != b and repr(a) == repr(b)
    assert isinstance(a, Credential)
