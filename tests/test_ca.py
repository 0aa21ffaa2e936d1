"""Tests for navtwist.ca: on-disk CA lifecycle and the per-hostname leaf certificates."""
from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import struct
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from navtwist.ca import CAError, CertificateAuthority

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


def test_creates_directory_and_files_with_strict_modes(tmp_path, umask):
    directory = tmp_path / "state" / "navtwist"
    ca = CertificateAuthority.load_or_create(directory, now=Clock())
    assert mode(tmp_path / "state") == 0o700
    assert mode(directory) == 0o700
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


def _write_pair(directory: Path, *, ca: bool, with_ski: bool) -> None:
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
    cert = builder.sign(key, hashes.SHA256())
    directory.mkdir(exist_ok=True)
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


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
def test_ip_literal_gets_ip_san(tmp_path, host):
    leaf = leaf_cert(CertificateAuthority.load_or_create(tmp_path, now=Clock()).server_options(host))
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(host)]
    assert san.get_values_for_type(x509.DNSName) == []


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


@pytest.mark.integration
@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_python_ssl_client_verifies_strictly_and_negotiates_alpn(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path)  # real clock: the client checks validity
    server_ctx = ca.server_options("inference.local").getContext()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            # pyOpenSSL needs a blocking socket; SO_RCVTIMEO/SO_SNDTIMEO keep it bounded.
            conn.setblocking(True)
            timeval = struct.pack("ll", 10, 0)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            tls = SSL.Connection(server_ctx, conn)
            # Twisted's ALPN callback reads the TLSMemoryBIOProtocol from app data
            # (factory.wrappedFactory); stand in for it, advertising no extra protocols.
            tls.set_app_data(SimpleNamespace(factory=SimpleNamespace(wrappedFactory=None)))
            tls.set_accept_state()
            tls.do_handshake()
            result["alpn"] = tls.get_alpn_proto_negotiated()
            tls.sendall(b"ok")
            tls.shutdown()
            conn.close()
        except Exception as e:  # reported by the main thread
            result["error"] = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        client_ctx.set_alpn_protocols(["h2", "http/1.1"])
        assert client_ctx.check_hostname and client_ctx.verify_mode == ssl.CERT_REQUIRED
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="inference.local") as tls:
                assert tls.selected_alpn_protocol() == "http/1.1"
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                assert tls.recv(2) == b"ok"
        thread.join(10)
    finally:
        listener.close()
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    assert result["alpn"] == b"http/1.1"
