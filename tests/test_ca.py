"""Tests for navtwist.ca: on-disk CA lifecycle and the per-hostname leaf certificates."""
from __future__ import annotations

import datetime
import errno
import fcntl
import ipaddress
import os
import re
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from navtwist.ca import CAError, CertificateAuthority, permitted_hosts
from navtwist.service.cli import main
from navtwist.config import load_config

T0 = datetime.datetime(2030, 6, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


class Clock:
    """A settable C{now} so tests can move time without sleeping."""

    def __init__(self, t: datetime.datetime = T0) -> None:
        self.t = t

    def __call__(self) -> datetime.datetime:
        return self.t


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leaf_cert(opts) -> x509.Certificate:
    return opts.certificate


def ca_cert(ca: CertificateAuthority) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.certificate_pem())


def ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


def assert_no_secrets(exc: BaseException, secrets: list[bytes]) -> None:
    """Neither the message nor the printed traceback may echo file content."""
    rendered = "".join(traceback.format_exception(exc))
    for secret in secrets:
        assert secret.decode() not in rendered
    assert "BEGIN" not in rendered


@pytest.fixture(params=[0o000, 0o077], ids=["umask000", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_creates_directory_and_files_readable_by_sandboxes_but_key_private(tmp_path, umask):
    directory = tmp_path / "state" / "navtwist"
    ca = CertificateAuthority.load_or_create(directory, now=Clock())
    assert mode(tmp_path / "state") == 0o755
    assert mode(directory) == 0o755
    assert ca.cert_path == directory / "ca.pem"
    assert ca.key_path == directory / "ca.key"
    assert mode(ca.key_path) == 0o600
    assert mode(ca.cert_path) == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["ca.key", "ca.pem"]
    assert ca.cert_path.read_bytes() == ca.certificate_pem()


def test_key_is_unencrypted_pkcs8_pem_matching_cert(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path, now=Clock())
    data = ca.key_path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == ca_cert(ca).public_key()


def test_ca_certificate_fields_and_extensions(tmp_path):
    cert = ca_cert(CertificateAuthority.load_or_create(tmp_path, now=Clock()))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "navtwist Sandbox CA"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "navtwist"
    assert cert.issuer == cert.subject
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))

    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign and ku.value.digital_signature
    assert not ku.value.key_encipherment
    ski = ext(cert, x509.SubjectKeyIdentifier)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(pub)

    assert cert.not_valid_before_utc == T0 - DAY
    assert cert.not_valid_after_utc == T0 + datetime.timedelta(days=3650)


def test_reload_reuses_ca_without_rewriting(tmp_path):
    first = CertificateAuthority.load_or_create(tmp_path, now=Clock())
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in (first.cert_path, first.key_path)}
    second = CertificateAuthority.load_or_create(tmp_path, now=Clock(T0 + 400 * DAY))
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in before}
    assert after == before
    assert second.certificate_pem() == first.certificate_pem()
    # The reloaded key really is the CA key: its leaves verify under the original cert.
    leaf = leaf_cert(second.server_options("inference.local"))
    ca_cert(first).public_key().verify(
        leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm)
    )


def test_mismatched_key_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    CertificateAuthority.load_or_create(a, now=Clock())
    CertificateAuthority.load_or_create(b, now=Clock())
    shutil.copyfile(b / "ca.key", a / "ca.key")
    with pytest.raises(CAError) as info:
        CertificateAuthority.load_or_create(a, now=Clock())
    assert str(info.value) == f"ca.key does not match ca.pem in {a}"
    assert_no_secrets(info.value, (b / "ca.key").read_bytes().splitlines()[1:-1])


@pytest.mark.parametrize("missing", ["ca.pem", "ca.key"])
def test_half_present_pair_is_refused_and_left_alone(tmp_path, missing):
    CertificateAuthority.load_or_create(tmp_path, now=Clock())
    (tmp_path / missing).unlink()
    (present,) = [p for p in tmp_path.iterdir()]
    before = (present.stat().st_ino, present.stat().st_mtime_ns, present.read_bytes())
    with pytest.raises(CAError) as info:
        CertificateAuthority.load_or_create(tmp_path, now=Clock())
    assert f"{tmp_path / missing} is missing" in str(info.value)
    assert (present.stat().st_ino, present.stat().st_mtime_ns, present.read_bytes()) == before
    assert not (tmp_path / missing).exists()
    assert [p for p in tmp_path.iterdir()] == [present]


def _garbled(path: Path) -> bytes:
    lines = path.read_bytes().splitlines(keepends=True)
    return lines[0] + b"SECRETMATERIALxyz" + b"".join(lines[1:])


def _encrypted(path: Path) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )


@pytest.mark.parametrize(
    "name, corrupt",
    [("ca.pem", _garbled), ("ca.key", _garbled), ("ca.key", _encrypted)],
    ids=["garbled-cert", "garbled-key", "encrypted-key"],
)
def test_corrupt_pem_names_the_file_without_its_content(tmp_path, name, corrupt):
    CertificateAuthority.load_or_create(tmp_path, now=Clock())
    target = tmp_path / name
    original = target.read_bytes()
    target.write_bytes(corrupt(target))
    with pytest.raises(CAError) as info:
        CertificateAuthority.load_or_create(tmp_path, now=Clock())
    assert str(target) in str(info.value)
    assert "\n" not in str(info.value)
    assert_no_secrets(info.value, [b"SECRETMATERIAL", *original.splitlines()[1:-1]])


def _imported_cert(
    *, ca: bool = True, with_ski: bool = True, permitted: list[x509.GeneralName] | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate navtwist did not make, as an operator might bring one, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imported")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0 - DAY)
        .not_valid_after(T0 + 100 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if with_ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    if permitted is not None:
        builder = builder.add_extension(
            x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), critical=True
        )
    return builder.sign(key, hashes.SHA256()), key


def _write_pair(directory: Path, *, ca: bool, with_ski: bool) -> None:
    cert, key = _imported_cert(ca=ca, with_ski=with_ski)
    directory.mkdir(exist_ok=True)
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "ca.key").chmod(0o600)


@pytest.mark.parametrize(
    "is_ca, with_ski, message",
    [(False, True, "is not a CA certificate"), (True, False, "has no SubjectKeyIdentifier")],
)
def test_unusable_existing_certificate_is_refused(tmp_path, is_ca, with_ski, message):
    _write_pair(tmp_path, ca=is_ca, with_ski=with_ski)
    with pytest.raises(CAError, match=message):
        CertificateAuthority.load_or_create(tmp_path, now=Clock())


def test_imported_ca_with_ski_is_accepted(tmp_path):
    _write_pair(tmp_path, ca=True, with_ski=True)
    ca = CertificateAuthority.load_or_create(tmp_path, now=Clock())
    assert ca.certificate_pem() == (tmp_path / "ca.pem").read_bytes()
    assert ca.unconstrained


def test_expired_ca_is_refused(tmp_path):
    CertificateAuthority.load_or_create(tmp_path, now=Clock())
    with pytest.raises(CAError, match="expired"):
        CertificateAuthority.load_or_create(tmp_path, now=Clock(T0 + 3650 * DAY))
    CertificateAuthority.load_or_create(tmp_path, now=Clock(T0 + 3649 * DAY))


def test_server_options_refused_once_ca_expires(tmp_path):
    clock = Clock()
    ca = CertificateAuthority.load_or_create(tmp_path, now=clock)
    ca.server_options("inference.local")
    clock.t = T0 + 3650 * DAY
    with pytest.raises(CAError, match="expired"):
        ca.server_options("inference.local")


def test_leaf_certificate_contents(tmp_path):
    clock = Clock(T0 + 10 * DAY)
    ca = CertificateAuthority.load_or_create(tmp_path, now=Clock())
    ca = CertificateAuthority.load_or_create(tmp_path, now=clock)
    root = ca_cert(ca)
    opts = ca.server_options("inference.local")
    leaf = leaf_cert(opts)

    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inference.local")])
    assert leaf.issuer == root.subject
    san = ext(leaf, x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["inference.local"]
    assert san.value.get_values_for_type(x509.IPAddress) == []

    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.key_encipherment
    assert ext(leaf, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )

    aki = ext(leaf, x509.AuthorityKeyIdentifier).value
    ca_ski = ext(root, x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert aki.authority_cert_issuer is None and aki.authority_cert_serial_number is None
    leaf_key = opts.privateKey
    assert ext(leaf, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        leaf_key.public_key()
    )
    assert isinstance(leaf_key, ec.EllipticCurvePrivateKey) and leaf_key.curve.name == "secp256r1"
    assert leaf_key.public_key() != root.public_key()

    root.public_key().verify(
        leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm)
    )
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert leaf.not_valid_before_utc == clock.t - DAY
    assert leaf.not_valid_after_utc == clock.t + 365 * DAY
    assert opts.extraCertChain == [root]


def test_leaves_have_distinct_keys_and_serials(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path, now=Clock())
    a, b = ca.server_options("a.local"), ca.server_options("b.local")
    assert a.privateKey.public_key() != b.privateKey.public_key()
    assert leaf_cert(a).serial_number != leaf_cert(b).serial_number


@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_server_options_tls_settings(tmp_path):
    opts = CertificateAuthority.load_or_create(tmp_path, now=Clock()).server_options("inference.local")
    assert opts._acceptableProtocols == [b"http/1.1"]
    ctx_options = opts.getContext().set_options(0)
    assert ctx_options & SSL.OP_NO_TLSv1 and ctx_options & SSL.OP_NO_TLSv1_1
    assert not ctx_options & SSL.OP_NO_TLSv1_2


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_ip_literal_gets_only_a_critical_ip_san(tmp_path, host):
    """No commonName: OpenSSL would check "127.0.0.1" against the CA's DNS name constraints."""
    leaf = leaf_cert(CertificateAuthority.load_or_create(tmp_path, now=Clock()).server_options(host))
    assert leaf.subject == x509.Name([])
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(host)]
    assert san.value.get_values_for_type(x509.DNSName) == []


def test_long_hostname_uses_critical_san_without_cn(tmp_path):
    host = "a" * 60 + ".example"
    leaf = leaf_cert(CertificateAuthority.load_or_create(tmp_path, now=Clock()).server_options(host))
    assert leaf.subject == x509.Name([])
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [host]


def test_cache_is_case_and_trailing_dot_insensitive(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path, now=Clock())
    opts = ca.server_options("inference.local")
    assert ca.server_options("Inference.LOCAL.") is opts
    assert ca.server_options("inference.local") is opts
    assert ca.server_options("other.local") is not opts
    assert leaf_cert(ca.server_options("INFERENCE.local.")).subject.rfc4514_string() == "CN=inference.local"


def test_cache_evicts_least_recently_used(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path, now=Clock(), leaf_cache_size=2)
    a = ca.server_options("a.local")
    b = ca.server_options("b.local")
    assert ca.server_options("a.local") is a  # a is now most recent
    ca.server_options("c.local")  # evicts b
    assert ca.server_options("a.local") is a
    assert ca.server_options("b.local") is not b  # reissued; this evicts c
    assert ca.server_options("a.local") is a


def test_cache_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        CertificateAuthority.load_or_create(tmp_path, now=Clock(), leaf_cache_size=0)


def test_leaf_near_expiry_is_regenerated(tmp_path):
    clock = Clock()
    ca = CertificateAuthority.load_or_create(tmp_path, now=clock)
    first = ca.server_options("inference.local")
    clock.t = T0 + 300 * DAY
    assert ca.server_options("inference.local") is first
    clock.t = T0 + 364 * DAY + datetime.timedelta(hours=1)
    renewed = ca.server_options("inference.local")
    assert renewed is not first
    assert leaf_cert(renewed).not_valid_after_utc == clock.t + 365 * DAY
    assert ca.server_options("inference.local") is renewed


def test_leaf_never_outlives_ca_and_is_not_reissued_in_a_loop(tmp_path):
    clock = Clock()
    ca = CertificateAuthority.load_or_create(tmp_path, now=clock)
    ca_not_after = ca_cert(ca).not_valid_after_utc
    clock.t = ca_not_after - 100 * DAY
    opts = ca.server_options("inference.local")
    assert leaf_cert(opts).not_valid_after_utc == ca_not_after
    clock.t = ca_not_after - datetime.timedelta(hours=12)
    assert ca.server_options("inference.local") is opts


# --- name constraints ------------------------------------------------------------------------

ALL_ADDRESSES = [x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")), x509.IPAddress(ipaddress.ip_network("::/0"))]


def name_constraints(ca: CertificateAuthority) -> x509.NameConstraints:
    extension = ext(ca_cert(ca), x509.NameConstraints)
    assert extension.critical
    return extension.value


@pytest.mark.parametrize(
    "permitted, subtrees, excluded",
    [
        (None, [x509.DNSName("inference.local")], ALL_ADDRESSES),  # the default
        (("inference.local", "api.example.com"),
         [x509.DNSName("inference.local"), x509.DNSName("api.example.com")], ALL_ADDRESSES),
        (("inference.local", "*.example.com"), [x509.DNSName("inference.local"), x509.DNSName("example.com")],
         ALL_ADDRESSES),
        (("Inference.LOCAL.", "inference.local", "*.Example.com", "example.com"),
         [x509.DNSName("inference.local"), x509.DNSName("example.com")], ALL_ADDRESSES),
        (("inference.local", "10.1.2.3"),
         [x509.DNSName("inference.local"), x509.IPAddress(ipaddress.ip_network("10.1.2.3/32"))], None),
        (("inference.local", "2001:DB8::1"),
         [x509.DNSName("inference.local"), x509.IPAddress(ipaddress.ip_network("2001:db8::1/128"))], None),
    ],
    ids=["default", "dns", "wildcard", "normalised-deduplicated", "ipv4", "ipv6"],
)
def test_new_ca_has_critical_name_constraints_for_the_permitted_hosts(tmp_path, permitted, subtrees, excluded):
    kwargs = {} if permitted is None else {"permitted": permitted}
    ca = CertificateAuthority.load_or_create(tmp_path, now=Clock(), **kwargs)
    assert name_constraints(ca) == x509.NameConstraints(permitted_subtrees=subtrees, excluded_subtrees=excluded)
    assert not ca.unconstrained


def test_permitted_none_creates_an_unconstrained_ca(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path, now=Clock(), permitted=None)
    with pytest.raises(x509.ExtensionNotFound):
        ext(ca_cert(ca), x509.NameConstraints)
    assert ca.unconstrained
    assert ca.covers(["anything.example", "10.0.0.1"]) is None


@pytest.mark.parametrize(
    "host, message",
    [
        ("*", "cannot restrict the CA to '*'"),
        ("a*.example.com", "cannot restrict the CA to 'a*.example.com'"),
        ("*.*.example.com", "cannot restrict the CA to '*.*.example.com'"),
        ("10.0.0.0/8", "cannot restrict the CA to '10.0.0.0/8'"),
        ("[::1]", "cannot restrict the CA to '[::1]'"),
        ("", "cannot restrict the CA to ''"),
    ],
)
def test_unusable_permitted_host_is_refused_before_anything_is_written(tmp_path, host, message):
    with pytest.raises(CAError, match=re.escape(message)):
        CertificateAuthority.load_or_create(tmp_path, now=Clock(), permitted=("inference.local", host))
    assert list(tmp_path.iterdir()) == []


def test_constraints_without_a_host_name_are_refused(tmp_path):
    """A CA permitting only addresses would leave every host name open (RFC 5280 constrains per name form)."""
    with pytest.raises(CAError, match="must permit at least one host name"):
        CertificateAuthority.load_or_create(tmp_path, now=Clock(), permitted=("10.0.0.1",))
    assert list(tmp_path.iterdir()) == []


COVERAGE_CA = ("inference.local", "*.example.com", "api.example.org", "10.1.2.3", "2001:db8::1")


@pytest.mark.parametrize(
    "host, covered",
    [
        ("inference.local", True),
        ("Inference.Local.", True),
        ("a.example.com", True),
        ("a.b.example.com", True),  # a DNS subtree holds every name below it
        ("example.com", True),
        ("*.example.com", True),
        ("*.a.example.com", True),
        ("api.example.org", True),
        ("v1.api.example.org", True),
        ("10.1.2.3", True),
        ("2001:db8::1", True),
        ("other.local", False),
        ("notexample.com", False),  # a suffix, but not below example.com
        ("example.org", False),
        ("*.example.org", False),
        ("10.1.2.4", False),
        ("::ffff:10.1.2.3", False),  # the IPv6 form of a permitted IPv4 address is another name
        ("2001:db8::2", False),
    ],
)
def test_covers_answers_like_rfc5280(tmp_path, host, covered):
    ca = CertificateAuthority.load_or_create(tmp_path, now=Clock(), permitted=COVERAGE_CA)
    assert ca.covers([host]) == (None if covered else host)


def test_covers_names_the_first_uncovered_host(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path, now=Clock())
    assert ca.covers([]) is None
    assert ca.covers(["inference.local", "a.example", "b.example"]) == "a.example"
    assert ca.covers(["127.0.0.1"]) == "127.0.0.1"  # no permitted address: all are excluded
    with pytest.raises(CAError, match="cannot restrict"):
        ca.covers(["a b"])


def test_covers_reads_constraints_of_imported_cas(tmp_path):
    """A leading dot (".example.com") holds only the names below it; an absent name form is open."""
    cert, key = _imported_cert(permitted=[x509.DNSName(".example.com")])
    ca = CertificateAuthority(tmp_path, cert, key, Clock(), 1)
    assert ca.covers(["a.example.com", "*.example.com", "10.0.0.1"]) is None
    assert ca.covers(["example.com"]) == "example.com"


def test_existing_ca_not_covering_a_permitted_host_is_refused_in_one_line(tmp_path):
    CertificateAuthority.load_or_create(tmp_path, now=Clock())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CAError) as info:
        CertificateAuthority.load_or_create(tmp_path, now=Clock(), permitted=("inference.local", "api.example.com"))
    assert str(info.value) == (
        f"CA certificate {tmp_path / 'ca.pem'} is not valid for api.example.com (its name constraints do not "
        "permit it); re-issue the CA with: navtwist ca rotate --config PATH"
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_ca_without_name_constraints_still_loads_but_is_flagged(tmp_path):
    CertificateAuthority.load_or_create(tmp_path, now=Clock(), permitted=None)  # as earlier versions made them
    ca = CertificateAuthority.load_or_create(tmp_path, now=Clock(), permitted=("inference.local", "api.example.com"))
    assert ca.unconstrained
    assert not CertificateAuthority.load_or_create(tmp_path / "new", now=Clock()).unconstrained


def test_permitted_hosts_are_inference_local_and_the_intercepted_hosts(tmp_path):
    assert permitted_hosts(load_config(None, {}, require_keys=False)) == ("inference.local",)
    intercept = [SimpleNamespace(host="api.example.com"), SimpleNamespace(host="10.0.0.1")]
    config = SimpleNamespace(policy=SimpleNamespace(intercept=intercept))
    assert permitted_hosts(config) == ("inference.local", "api.example.com", "10.0.0.1")


# --- permissions -----------------------------------------------------------------------------


@pytest.mark.parametrize("key_mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_key_accessible_to_others_is_refused_with_the_fix(tmp_path, key_mode):
    CertificateAuthority.load_or_create(tmp_path, now=Clock())
    key = tmp_path / "ca.key"
    key.chmod(key_mode)
    with pytest.raises(CAError) as info:
        CertificateAuthority.load_or_create(tmp_path, now=Clock())
    assert str(info.value) == (
        f"{key} is accessible to group or others (mode {key_mode:04o}); fix with: chmod 600 {key}"
    )
    key.chmod(0o600)
    CertificateAuthority.load_or_create(tmp_path, now=Clock())


def test_key_readable_by_owner_only_is_accepted(tmp_path):
    CertificateAuthority.load_or_create(tmp_path, now=Clock())
    (tmp_path / "ca.key").chmod(0o400)
    CertificateAuthority.load_or_create(tmp_path, now=Clock())


# --- crash recovery and rotation ------------------------------------------------------------


def pair(directory: Path) -> tuple[bytes, bytes]:
    return (directory / "ca.key").read_bytes(), (directory / "ca.pem").read_bytes()


def test_stale_temporaries_are_deleted_at_start_and_nothing_else(tmp_path):
    CertificateAuthority.load_or_create(tmp_path, now=Clock())
    kept = pair(tmp_path)
    (tmp_path / ".ca.key.0123abcd.tmp").write_bytes(b"half a key")  # left by earlier versions
    (tmp_path / ".ca.pem.0123abcd.tmp").write_bytes(b"a cert")
    (tmp_path / ".ca.x1y2z3.tmp").mkdir()  # an uncommitted new pair
    (tmp_path / ".ca.x1y2z3.tmp" / "ca.key").write_bytes(b"a key")
    (tmp_path / ".bundle.pem.q.tmp").write_bytes(b"navtwist env's")
    (tmp_path / "bundle.pem").write_bytes(b"bundle")
    CertificateAuthority.load_or_create(tmp_path, now=Clock())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.pem.q.tmp", "bundle.pem", "ca.key", "ca.pem"]
    assert pair(tmp_path) == kept


@pytest.mark.parametrize("moved", [(), ("ca.key",), ("ca.key", "ca.pem")], ids=["none", "key", "both"])
def test_committed_pair_is_installed_at_start(tmp_path, moved):
    """A crash after the commit point: the staged pair wins over the old one, however far it got."""
    new, old = tmp_path / "new", tmp_path / "old"
    CertificateAuthority.load_or_create(new, now=Clock())
    CertificateAuthority.load_or_create(old, now=Clock())
    staged = old / ".ca.new"
    staged.mkdir()
    for name in ("ca.key", "ca.pem"):
        shutil.copy2(new / name, (old if name in moved else staged) / name)
    ca = CertificateAuthority.load_or_create(old, now=Clock())
    assert pair(old) == pair(new)
    assert ca.certificate_pem() == (new / "ca.pem").read_bytes()
    assert sorted(p.name for p in old.iterdir()) == ["ca.key", "ca.pem"]


def test_certificate_an_earlier_version_left_beside_its_key_is_installed(tmp_path):
    """Earlier versions, killed between installing ca.key and ca.pem, left the
    certificate as .ca.pem.*.tmp and refused every later start (issue #11)."""
    crashed, other = tmp_path / "crashed", tmp_path / "other"
    CertificateAuthority.load_or_create(crashed, now=Clock())
    CertificateAuthority.load_or_create(other, now=Clock())
    intended = pair(crashed)
    (crashed / "ca.pem").rename(crashed / ".ca.pem.0123abcd.tmp")
    shutil.copy2(other / "ca.pem", crashed / ".ca.pem.fedc4321.tmp")  # another key's: not installed
    ca = CertificateAuthority.load_or_create(crashed, now=Clock())
    assert pair(crashed) == intended and ca.certificate_pem() == intended[1]
    assert sorted(p.name for p in crashed.iterdir()) == ["ca.key", "ca.pem"]


def test_certificate_of_another_key_does_not_complete_a_half_pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    CertificateAuthority.load_or_create(a, now=Clock())
    CertificateAuthority.load_or_create(b, now=Clock())
    (a / "ca.pem").unlink()
    shutil.copy2(b / "ca.pem", a / ".ca.pem.0123abcd.tmp")
    with pytest.raises(CAError, match="ca.pem is missing"):
        CertificateAuthority.load_or_create(a, now=Clock())
    assert sorted(p.name for p in a.iterdir()) == ["ca.key"]


def test_creation_waits_for_the_directory_lock(tmp_path):
    """Two processes starting at once must not each install half a pair or delete the other's temporaries."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        creator = threading.Thread(target=CertificateAuthority.load_or_create, args=(tmp_path,), daemon=True)
        creator.start()
        creator.join(0.5)
        assert creator.is_alive() and list(tmp_path.iterdir()) == []
    finally:
        os.close(fd)  # releases the lock
    creator.join(10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem"]


def test_failed_creation_leaves_nothing_behind(tmp_path, monkeypatch):
    def refuse(source, destination):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(CAError) as info:
        CertificateAuthority.load_or_create(tmp_path, now=Clock())
    assert str(info.value) == f"cannot create CA in {tmp_path}: Input/output error"
    assert list(tmp_path.iterdir()) == []


def test_rotate_replaces_the_pair_with_one_for_the_new_hosts(tmp_path):
    old = CertificateAuthority.load_or_create(tmp_path, now=Clock())
    old_pair = pair(tmp_path)
    clock = Clock(T0 + 10 * DAY)
    new = CertificateAuthority.rotate(tmp_path, now=clock, permitted=("inference.local", "api.example.com"))
    new_key, new_pem = pair(tmp_path)
    assert new_key != old_pair[0] and new_pem != old_pair[1]
    assert new.certificate_pem() == new_pem
    assert ca_cert(new).not_valid_before_utc == clock.t - DAY
    assert new.covers(["inference.local", "api.example.com"]) is None
    assert old.covers(["api.example.com"]) == "api.example.com"
    assert (mode(tmp_path / "ca.key"), mode(tmp_path / "ca.pem")) == (0o600, 0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem"]
    reloaded = CertificateAuthority.load_or_create(tmp_path, now=clock, permitted=("api.example.com",))
    assert reloaded.certificate_pem() == new_pem
    leaf = leaf_cert(reloaded.server_options("api.example.com"))
    ca_cert(new).public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))


def test_rotate_repairs_a_half_present_pair(tmp_path):
    CertificateAuthority.load_or_create(tmp_path, now=Clock())
    (tmp_path / "ca.pem").unlink()
    CertificateAuthority.rotate(tmp_path, now=Clock())
    CertificateAuthority.load_or_create(tmp_path, now=Clock())


# --- navtwist ca rotate ----------------------------------------------------------------------


def rotate_config(tmp_path: Path, intercept: tuple[str, ...] = ()) -> Path:
    path = tmp_path / "navtwist.yaml"
    routes = [{"name": "inference.local", "endpoint": "mock://", "model": "m", "protocols": ["openai_chat_completions"]}]
    policy = {"intercept": [{"host": host, "access": "read-only"} for host in intercept]}
    path.write_text(yaml.safe_dump({"ca_dir": str(tmp_path / "ca"), "routes": routes, "policy": policy}))
    return path


def test_command_rotates_the_ca_and_rewrites_the_bundle(tmp_path, capsys):
    config = rotate_config(tmp_path)
    ca_dir = tmp_path / "ca"
    assert main(["env", "--config", str(config)]) == 0
    old_key, old_pem = pair(ca_dir)
    capsys.readouterr()

    assert main(["ca", "rotate", "--config", str(config)]) == 0

    out, _ = capsys.readouterr()
    assert out == (
        f"navtwist ca rotate: re-issued the CA in {ca_dir} for inference.local and rewrote "
        f"{ca_dir / 'bundle.pem'}; restart navtwist and the sandboxes so they pick up the new CA\n"
    )
    new_key, new_pem = pair(ca_dir)
    assert new_key != old_key and new_pem != old_pem
    bundle = (ca_dir / "bundle.pem").read_bytes()
    assert bundle.endswith(new_pem) and old_pem not in bundle
    assert sorted(p.name for p in ca_dir.iterdir()) == ["bundle.pem", "ca.key", "ca.pem"]


@pytest.mark.parametrize("command", [["env"], ["ca", "rotate"]])
def test_commands_make_the_ca_for_the_configs_hosts(tmp_path, capsys, command):
    hosts = ("inference.local", "*.example.com", "10.0.0.1")
    assert main([*command, "--config", str(rotate_config(tmp_path, hosts[1:]))]) == 0
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", permitted=hosts)
    assert not ca.unconstrained and ca.covers(hosts) is None
    assert ca.covers(["other.example"]) == "other.example"


def test_command_ca_dir_overrides_the_config(tmp_path, capsys):
    assert main(["ca", "rotate", "-c", str(rotate_config(tmp_path)), "--ca-dir", str(tmp_path / "other")]) == 0
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["bundle.pem", "ca.key", "ca.pem"]
    assert not (tmp_path / "ca").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [(["--config", "missing.yaml"], "missing.yaml: cannot read"), (["--ca-dir", "a-file"], "Not a directory")],
)
def test_command_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, extra, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").touch()
    assert main(["ca", "rotate", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("navtwist ca rotate: ") and err.count("\n") == 1 and expected in err


def test_command_usage(capsys):
    assert main(["ca"]) == 2
    err = capsys.readouterr().err
    assert "choose an action: rotate" in err and err.count("\n") == 1


# --- real TLS clients --------------------------------------------------------------------------

TIMEOUT = 10  # seconds; bounds every socket and subprocess below
CURL = shutil.which("curl")
NODE = shutil.which("node")
# https.get with only navtwist's CA trusted; prints the body, or the error's code and message.
NODE_GET = """
const https = require("https"), fs = require("fs");
const [host, address, port, ca] = process.argv.slice(1);
const options = {host: address, port: Number(port), path: "/", ca: fs.readFileSync(ca), timeout: 10000};
if (host !== address) options.servername = host;  // Node refuses an IP address as SNI name
https.get(options, (res) => {
  let body = "";
  res.on("data", (chunk) => body += chunk);
  res.on("end", () => process.stdout.write(body));
}).on("error", (e) => { process.stderr.write(`${e.code}: ${e.message}`); process.exit(1); });
"""


class TLSServer:
    """A loopback server presenting C{options}: per connection, a handshake, one
    request head, a C{200} answering C{ok}.  Handshake failures are kept in C{errors}."""

    def __init__(self, options, address: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.listener = socket.create_server((address, 0), family=family)
        self.port = self.listener.getsockname()[1]
        self.alpn: list[bytes] = []
        self.errors: list[Exception] = []
        self._context = options.getContext()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self.listener.close()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # shut down
                return
            with conn:
                try:
                    self._answer(conn)
                except Exception as e:  # reported through self.errors
                    self.errors.append(e)

    def _answer(self, conn: socket.socket) -> None:
        # pyOpenSSL needs a blocking socket; SO_RCVTIMEO/SO_SNDTIMEO keep it bounded.
        conn.setblocking(True)
        timeval = struct.pack("ll", TIMEOUT, 0)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        tls = SSL.Connection(self._context, conn)
        # Twisted's ALPN callback reads the TLSMemoryBIOProtocol from app data
        # (factory.wrappedFactory); stand in for it, advertising no extra protocols.
        tls.set_app_data(SimpleNamespace(factory=SimpleNamespace(wrappedFactory=None)))
        tls.set_accept_state()
        tls.do_handshake()
        self.alpn.append(tls.get_alpn_proto_negotiated())
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(4096)
        tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        tls.shutdown()


def strict_client_context(ca: CertificateAuthority) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def python_get(ca: CertificateAuthority, host: str, address: str, port: int) -> str:
    with socket.create_connection((address, port), timeout=TIMEOUT) as raw:
        with strict_client_context(ca).wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            response = b""
            while chunk := tls.recv(4096):
                response += chunk
    return response.partition(b"\r\n\r\n")[2].decode()


def subprocess_get(ca: CertificateAuthority, client: str, host: str, address: str, port: int):
    """curl or node fetching C{https://host:port/} from C{address}, trusting only C{ca}."""
    if client == "curl":
        if CURL is None:
            pytest.skip("curl is not installed")
        url_host = f"[{host}]" if ":" in host else host
        args = [CURL, "--silent", "--show-error", "--max-time", str(TIMEOUT), "--noproxy", "*",
                "--cacert", str(ca.cert_path), f"https://{url_host}:{port}/"]
        if host != address:
            args[1:1] = ["--resolve", f"{host}:{port}:{address}"]
    else:
        if NODE is None:
            pytest.skip("node is not installed")
        args = [NODE, "-e", NODE_GET, host, address, str(port), str(ca.cert_path)]
    # A bare environment: no proxy or CA variables of the machine running the tests.
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, env={"PATH": os.environ["PATH"]})


def ipv6_loopback() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


CONSTRAINED = ("inference.local", "127.0.0.1", "::1")


@pytest.mark.integration
@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_python_ssl_client_verifies_strictly_and_negotiates_alpn(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path)  # real clock: the client checks validity
    with TLSServer(ca.server_options("inference.local")) as server:
        client_context = strict_client_context(ca)
        client_context.set_alpn_protocols(["h2", "http/1.1"])
        assert client_context.check_hostname and client_context.verify_mode == ssl.CERT_REQUIRED
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
            with client_context.wrap_socket(raw, server_hostname="inference.local") as tls:
                assert tls.selected_alpn_protocol() == "http/1.1"
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                tls.sendall(b"GET / HTTP/1.1\r\nhost: inference.local\r\n\r\n")
                assert tls.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
    assert server.errors == []
    assert server.alpn == [b"http/1.1"]


@pytest.mark.integration
@pytest.mark.parametrize("client", ["python", "curl", "node"])
@pytest.mark.parametrize(
    "host, address", [("inference.local", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("::1", "::1")]
)
def test_clients_accept_leaves_inside_the_name_constraints(tmp_path, client, host, address):
    if ":" in address and not ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    ca = CertificateAuthority.load_or_create(tmp_path, permitted=CONSTRAINED)  # real clock
    with TLSServer(ca.server_options(host), address) as server:
        if client == "python":
            assert python_get(ca, host, address, server.port) == "ok"
        else:
            result = subprocess_get(ca, client, host, address, server.port)
            assert (result.returncode, result.stdout, result.stderr) == (0, "ok", "")
    assert server.errors == []


@pytest.mark.integration
@pytest.mark.parametrize("client", ["python", "curl", "node"])
@pytest.mark.parametrize(
    "host, permitted, violation",
    [
        ("evil.example", CONSTRAINED, "permitted subtree violation"),  # a name outside the DNS subtrees
        ("127.0.0.2", CONSTRAINED, "permitted subtree violation"),  # an address outside the /32s
        ("127.0.0.1", ("inference.local",), "excluded subtree violation"),  # no address permitted at all
    ],
)
def test_clients_reject_leaves_outside_the_name_constraints(tmp_path, client, host, permitted, violation):
    """The constraints are real: a leaf the CA key signs for another host fails verification."""
    ca = CertificateAuthority.load_or_create(tmp_path, permitted=permitted)
    leaf = ca._issue(host, datetime.datetime.now(datetime.timezone.utc))
    with TLSServer(leaf.options) as server:
        if client == "python":
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                python_get(ca, host, "127.0.0.1", server.port)
            assert info.value.verify_message == violation
        else:
            result = subprocess_get(ca, client, host, "127.0.0.1", server.port)
            assert result.returncode != 0 and result.stdout == ""
            assert violation in result.stderr
    assert len(server.errors) == 1  # the handshake the client aborted
