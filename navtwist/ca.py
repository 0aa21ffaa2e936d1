"""The interception CA: signs the leaf certificates navtwist presents for C{inference.local}.

Sandboxed clients trust only this CA, so its key never leaves the state
directory, and a half-written or mismatched key/cert pair is refused rather
than silently replaced.
"""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import pathlib
import secrets
from collections import OrderedDict
from typing import Callable, NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.ssl import CertificateOptions, TLSVersion

CA_COMMON_NAME = "navtwist Sandbox CA"
CA_ORGANIZATION = "navtwist"
CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)
# Back-dating notBefore lets clients whose clocks lag ours accept the certs.
BACKDATE = datetime.timedelta(days=1)
# A cached leaf this close to notAfter is reissued so no client sees it expire.
RENEW_MARGIN = datetime.timedelta(days=1)
# X.509 upper bound on commonName; longer hostnames rely on the SAN alone.
_MAX_COMMON_NAME = 64

_CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CAError(Exception):
    """One-line human message, never containing key material."""


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _normalise_hostname(hostname: str) -> str:
    """Lower-case without the trailing dot, so C{Inference.Local.} shares a cache entry."""
    name = hostname.lower().rstrip(".")
    if not name:
        raise ValueError("hostname must not be empty")
    return name


class _Leaf(NamedTuple):
    options: CertificateOptions
    not_after: datetime.datetime


class CertificateAuthority:
    """A CA kept as C{ca.pem}/C{ca.key} in one directory; use L{load_or_create}.

    Not thread-safe: meant to be used from the reactor thread only.
    """

    def __init__(
        self,
        directory: pathlib.Path,
        ca_cert: x509.Certificate,
        ca_key: _CAKey,
        now: Callable[[], datetime.datetime],
        leaf_cache_size: int,
    ) -> None:
        if leaf_cache_size < 1:
            raise ValueError("leaf_cache_size must be at least 1")
        self.cert_path = directory / "ca.pem"
        self.key_path = directory / "ca.key"
        self._cert = ca_cert
        self._key = ca_key
        self._now = now
        self._cache_size = leaf_cache_size
        self._cache: OrderedDict[str, _Leaf] = OrderedDict()
        # AKI must repeat the CA's SKI byte for byte; strict verifiers compare them.
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )

    @classmethod
    def load_or_create(
        cls,
        directory: str | os.PathLike[str],
        now: Callable[[], datetime.datetime] | None = None,
        leaf_cache_size: int = 256,
    ) -> CertificateAuthority:
        """Load the CA from C{directory}, creating it (and the directory) on first start.

        @raise CAError: when only one of the two files exists, either is
            unreadable or corrupt, the key does not match the certificate,
            or the CA has expired.
        """
        clock = now or _utcnow
        path = pathlib.Path(directory)
        cert_path, key_path = path / "ca.pem", path / "ca.key"
        cert_exists, key_exists = cert_path.exists(), key_path.exists()
        if cert_exists and key_exists:
            ca_cert, ca_key = _load(path, cert_path, key_path, clock())
        elif cert_exists or key_exists:
            present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
            raise CAError(
                f"{missing} is missing but {present} exists; refusing to replace it "
                f"(restore {missing.name} or remove {present.name} to create a new CA)"
            )
        else:
            ca_cert, ca_key = _create(path, cert_path, key_path, clock())
        return cls(path, ca_cert, ca_key, clock, leaf_cache_size)

    def certificate_pem(self) -> bytes:
        """The CA certificate, for installing into sandbox trust stores."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def server_options(self, hostname: str) -> CertificateOptions:
        """TLS server options presenting a leaf for C{hostname}, reused while it stays fresh.

        @raise CAError: if the CA itself has expired.
        """
        now = self._now()
        ca_not_after = self._cert.not_valid_after_utc
        if now >= ca_not_after:
            raise CAError(f"CA certificate {self.cert_path} expired on {ca_not_after:%Y-%m-%d}")
        name = _normalise_hostname(hostname)
        leaf = self._cache.get(name)
        # A leaf clamped to the CA's notAfter cannot be improved by reissuing it.
        if leaf is not None and (leaf.not_after - now > RENEW_MARGIN or leaf.not_after >= ca_not_after):
            self._cache.move_to_end(name)
            return leaf.options
        leaf = self._issue(name, now)
        self._cache[name] = leaf
        self._cache.move_to_end(name)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return leaf.options

    def _issue(self, name: str, now: datetime.datetime) -> _Leaf:
        """Sign a fresh leaf (with its own key) for the normalised C{name}."""
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        if len(name) <= _MAX_COMMON_NAME:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        else:
            subject = x509.Name([])
        not_after = min(now + LEAF_VALIDITY, self._cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            # RFC 5280: with an empty subject the SAN carries the identity and is critical.
            .add_extension(x509.SubjectAlternativeName([san]), critical=len(subject) == 0)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(self._aki, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        # pyOpenSSL >= 24.3 takes cryptography objects directly and deprecates its own
        # PKey/X509 wrappers there; Twisted only forwards these to the SSL.Context.
        options = CertificateOptions(
            privateKey=key,
            certificate=cert,
            extraCertChain=[self._cert],
            acceptableProtocols=[b"http/1.1"],
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        return _Leaf(options, cert.not_valid_after_utc)


def _key_usage(
    digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CAError(f"cannot read {path}: {e.strerror}") from None


def _load(
    directory: pathlib.Path,
    cert_path: pathlib.Path,
    key_path: pathlib.Path,
    now: datetime.datetime,
) -> tuple[x509.Certificate, _CAKey]:
    """Load and validate an existing pair; parser errors are dropped so no PEM text leaks."""
    try:
        ca_cert = x509.load_pem_x509_certificate(_read(cert_path))
    except ValueError:
        raise CAError(f"{cert_path} is not a valid PEM certificate") from None
    try:
        ca_key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CAError(f"{key_path} is not a valid unencrypted PEM private key") from None
    if not isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CAError(f"{key_path} holds an unsupported key type (need EC or RSA)")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if ca_key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki):
        raise CAError(f"ca.key does not match ca.pem in {directory}")
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CAError(f"{cert_path} is not a CA certificate (no BasicConstraints CA:TRUE)")
    try:
        ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        raise CAError(
            f"{cert_path} has no SubjectKeyIdentifier, which strict TLS clients require"
        ) from None
    if now >= ca_cert.not_valid_after_utc:
        raise CAError(
            f"CA certificate {cert_path} expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
            f"remove ca.pem and ca.key in {directory} to create a new CA"
        )
    return ca_cert, ca_key


def _make_dirs(directory: pathlib.Path) -> None:
    """Create C{directory} and any missing parents as 0700, whatever the umask."""
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)


def _write_new(path: pathlib.Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, with C{mode} from the moment it is created."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    with open(fd, "wb") as f:
        os.fchmod(fd, mode)  # the umask may have stripped bits we want (0644 for the cert)
        f.write(data)
        f.flush()
        os.fsync(fd)


def _create(
    directory: pathlib.Path,
    cert_path: pathlib.Path,
    key_path: pathlib.Path,
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Generate a CA and publish it key first, cert last, so a crash leaves no usable pair."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    suffix = secrets.token_hex(8)
    tmp_key = directory / f".ca.key.{suffix}.tmp"
    tmp_cert = directory / f".ca.pem.{suffix}.tmp"
    try:
        _make_dirs(directory)
        _write_new(tmp_key, key_pem, 0o600)
        _write_new(tmp_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        os.replace(tmp_key, key_path)
        os.replace(tmp_cert, cert_path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise CAError(f"cannot create CA in {directory}: {e.strerror}") from None
    finally:
        for leftover in (tmp_key, tmp_cert):  # already renamed on success
            with contextlib.suppress(OSError):
                leftover.unlink()
    return cert, key
