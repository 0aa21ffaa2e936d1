"""The interception CA: signs the leaf certificates navtwist presents for the hosts it intercepts.

Sandboxed clients trust only this CA, so its key never leaves the state
directory, and a half-present or mismatched key/cert pair is refused rather
than silently replaced.  Sandboxes may run as other users, so the directory
and C{ca.pem} are world-readable (0755, 0644); C{ca.key} is 0600, and one that
group or others may access is refused.

A leaked C{ca.key} must not impersonate arbitrary sites: the CA carries
critical X.509 name constraints permitting only the hosts it signs for
(L{DEFAULT_PERMITTED} plus the configured intercept hosts).

A new pair (first start, C{navtwist ca rotate}) is installed crash-safely:
both files are written and fsynced in a fresh C{.ca.*.tmp} directory, which is
then renamed to C{.ca.new} -- that rename is the commit point -- and finally
moved into place file by file.  Every start, holding an exclusive lock on the
directory (so concurrent starts and C{navtwist env} runs do not interleave),
first finishes an installation a crash interrupted (C{.ca.new} exists, or an
earlier version left C{ca.key} beside its certificate's C{.ca.pem.*.tmp}) and
deletes whatever C{.ca.*.tmp} a crash left before the commit, including the
C{.ca.key.*.tmp} files of earlier versions: uncommitted private keys nobody
may use.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import pathlib
import re
import shutil
import stat
import tempfile
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.ssl import CertificateOptions, TLSVersion

from navtwist.config import Config

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
# The hosts a CA is constrained to when the caller names none.
# The virtual host navtwist serves itself; every CA must be able to vouch for it.
INFERENCE_HOST = "inference.local"
DEFAULT_PERMITTED = (INFERENCE_HOST,)
_CERT, _KEY = "ca.pem", "ca.key"
# A complete new pair waiting to be moved into place (see the module docstring).
_STAGED = ".ca.new"
# Uncommitted new pairs (directories) and the temporaries of earlier versions (files).
_TEMPORARIES = ".ca.*.tmp"
_DNS_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_ALL_ADDRESSES = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))

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
        self.cert_path = directory / _CERT
        self.key_path = directory / _KEY
        self._cert = ca_cert
        self._key = ca_key
        self._now = now
        self._cache_size = leaf_cache_size
        self._cache: OrderedDict[str, _Leaf] = OrderedDict()
        # AKI must repeat the CA's SKI byte for byte; strict verifiers compare them.
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
        constraints: x509.NameConstraints | None
        try:
            constraints = ca_cert.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        self._constraints = constraints
        # True for a CA made before name constraints (or with them turned off):
        # it works, but its leaked key would sign for any site, so say so.
        self.unconstrained = constraints is None

    @classmethod
    def load_or_create(
        cls,
        directory: str | os.PathLike[str],
        now: Callable[[], datetime.datetime] | None = None,
        leaf_cache_size: int = 256,
        permitted: Sequence[str] | None = DEFAULT_PERMITTED,
    ) -> CertificateAuthority:
        """Load the CA from C{directory}, creating it (and the directory) on first start.

        A new CA is constrained to the hosts C{permitted} (None: no name
        constraints); an existing constrained CA must permit all of them.

        @raise CAError: when only one of the two files exists, either is
            unreadable or corrupt, the key may be read by others, the key does
            not match the certificate, the CA has expired, or its name
            constraints do not permit a host of C{permitted}.
        """
        clock = now or _utcnow
        path = pathlib.Path(directory)
        cert_path, key_path = path / _CERT, path / _KEY
        with _locked(path):
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
                ca_cert, ca_key = _create(path, clock(), permitted)
        ca = cls(path, ca_cert, ca_key, clock, leaf_cache_size)
        uncovered = ca.covers(permitted or ())
        if uncovered is not None:
            raise CAError(
                f"CA certificate {cert_path} is not valid for {uncovered} (its name constraints do not "
                "permit it); re-issue the CA with: navtwist ca rotate --config PATH"
            )
        return ca

    @classmethod
    def rotate(
        cls,
        directory: str | os.PathLike[str],
        now: Callable[[], datetime.datetime] | None = None,
        leaf_cache_size: int = 256,
        permitted: Sequence[str] | None = DEFAULT_PERMITTED,
    ) -> CertificateAuthority:
        """Replace the CA in C{directory}, whatever state it is in, by a new one for C{permitted}.

        The old files are replaced only once the new pair is complete on disk.

        @raise CAError: when the new pair cannot be written.
        """
        clock = now or _utcnow
        path = pathlib.Path(directory)
        with _locked(path):
            ca_cert, ca_key = _create(path, clock(), permitted)
        return cls(path, ca_cert, ca_key, clock, leaf_cache_size)

    def covers(self, hosts: Iterable[str]) -> str | None:
        """The first of C{hosts} this CA's name constraints do not permit, else None.

        Hosts are written as in the config: C{name}, C{*.domain} or an IP
        literal.  An unconstrained CA (see L{unconstrained}) permits every host.

        @raise CAError: for a host that is none of these.
        """
        if self._constraints is None:
            return None
        for host in hosts:
            if not _permits(self._constraints, host):
                return host
        return None

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
        # OpenSSL checks a host-like commonName ("127.0.0.1") against the CA's
        # DNS name constraints, so IP literals rely on the (critical) SAN alone.
        if isinstance(san, x509.DNSName) and len(name) <= _MAX_COMMON_NAME:
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
        # PKey/X509 wrappers there; Twisted only forwards these to the SSL.Context
        # (its annotations still name the wrappers).
        options = CertificateOptions(
            privateKey=key,  # type: ignore[arg-type]
            certificate=cert,  # type: ignore[arg-type]
            extraCertChain=[self._cert],  # type: ignore[list-item]
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
        key_mode = stat.S_IMODE(key_path.stat().st_mode)
    except OSError as e:
        raise CAError(f"cannot read {key_path}: {e.strerror}") from None
    if key_mode & 0o077:
        raise CAError(
            f"{key_path} is accessible to group or others (mode {key_mode:04o}); "
            f"fix with: chmod 600 {key_path}"
        )
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
    """Create C{directory} and any missing parents as 0755, whatever the umask,
    so sandboxes running as other users can reach C{ca.pem}."""
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            continue
        os.chmod(path, 0o755)


def _write_new(path: pathlib.Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, with C{mode} from the moment it is created."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    with open(fd, "wb") as f:
        os.fchmod(fd, mode)  # the umask may have stripped bits we want (0644 for the cert)
        f.write(data)
        f.flush()
        os.fsync(fd)


def _create(
    directory: pathlib.Path, now: datetime.datetime, permitted: Sequence[str] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Generate a CA constrained to C{permitted} (None: unconstrained) and install it in the locked C{directory}."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
        ]
    )
    builder = (
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
    )
    if permitted is not None:
        # RFC 5280 requires name constraints to be critical.
        builder = builder.add_extension(_name_constraints(permitted), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _install(directory, {_KEY: (key_pem, 0o600), _CERT: (cert_pem, 0o644)})
    return cert, key


def _name_constraints(permitted: Sequence[str]) -> x509.NameConstraints:
    """Name constraints permitting exactly the hosts C{permitted} (see L{_subtree}).

    @raise CAError: for a host that is not a name, C{*.domain} or IP literal,
        or when no host name is permitted at all.
    """
    subtrees = list(dict.fromkeys(_subtree(host) for host in permitted))
    # RFC 5280 constrains only the name forms a constraint lists: without a
    # DNS subtree every host name would stay open, without an IP subtree
    # every address, which is then excluded explicitly.
    if not any(isinstance(subtree, x509.DNSName) for subtree in subtrees):
        raise CAError("the CA's name constraints must permit at least one host name")
    excluded = None
    if not any(isinstance(subtree, x509.IPAddress) for subtree in subtrees):
        excluded = [x509.IPAddress(network) for network in _ALL_ADDRESSES]
    return x509.NameConstraints(permitted_subtrees=subtrees, excluded_subtrees=excluded)


def _subtree(host: str) -> x509.DNSName | x509.IPAddress:
    """The name-constraint subtree permitting C{host}: /32 or /128 for an IP literal, else a DNS subtree.

    A DNS subtree C{example.com} permits example.com and every name below it
    (C{a.b.example.com}), so C{*.example.com} (one label) becomes the whole
    example.com subtree and C{api.example.com} also permits its subdomains:
    a leaked key could sign for those too, never for a host outside them.
    """
    name = host.lower().rstrip(".")
    try:
        return x509.IPAddress(ipaddress.ip_network(ipaddress.ip_address(name)))
    except ValueError:
        pass
    domain = name[2:] if name.startswith("*.") else name
    if not _DNS_NAME.fullmatch(domain):
        raise CAError(f"cannot restrict the CA to {host!r}: not a host name, *.domain or IP address")
    return x509.DNSName(domain)


def _permits(constraints: x509.NameConstraints, host: str) -> bool:
    """Whether C{constraints} permit C{host}, judged as RFC 5280 does for its name form (DNS or IP).

    A wildcard is permitted when every name it matches is: C{*.example.com}
    is checked as that literal name, so only subtrees above it contain it.
    """
    form = type(_subtree(host))
    name = host.lower().rstrip(".")

    def matches(subtrees: Iterable[x509.GeneralName] | None) -> list[bool]:
        return [_contains(subtree, name) for subtree in subtrees or () if isinstance(subtree, form)]

    permitted = matches(constraints.permitted_subtrees)
    return (not permitted or any(permitted)) and not any(matches(constraints.excluded_subtrees))


def _contains(subtree: x509.GeneralName, name: str) -> bool:
    if isinstance(subtree, x509.IPAddress):
        # An address of the other IP version is outside the subtree.
        return ipaddress.ip_address(name) in ipaddress.ip_network(subtree.value)
    domain = subtree.value.lower()
    # A leading dot (".example.com", a variant found in imported CAs) holds only the names below it.
    return name == domain or name.endswith(domain if domain.startswith(".") else "." + domain)


def permitted_hosts(config: Config) -> tuple[str, ...]:
    """The hosts the CA for C{config} must permit: C{inference.local} and every intercepted host."""
    return (*DEFAULT_PERMITTED, *(entry.host for entry in config.policy.intercept))


def load_for(config: Config) -> CertificateAuthority:
    """The CA, constrained to the hosts navtwist may present leaves for (unless
    C{ca_name_constraints: false}); an existing CA must cover them either way.

    @raise CAError: with one line naming the uncovered host and the fix.
    """
    hosts = permitted_hosts(config)
    ca = CertificateAuthority.load_or_create(config.ca_dir, permitted=hosts if config.ca_name_constraints else None)
    uncovered = ca.covers(hosts)
    if uncovered is not None:
        raise CAError(f"CA certificate {ca.cert_path} is not valid for {uncovered}; "
                      "re-issue the CA with: navtwist ca rotate --config PATH")
    return ca


@contextlib.contextmanager
def _locked(directory: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive lock on C{directory} (created if missing) after tidying what a crash left there."""
    try:
        _make_dirs(directory)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise CAError(f"cannot open CA directory {directory}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _recover(directory)
        except OSError as e:
            raise CAError(f"cannot recover the CA in {directory}: {e.strerror}") from None
        yield
    finally:
        os.close(fd)


def _recover(directory: pathlib.Path) -> None:
    """Finish a committed installation and delete uncommitted temporaries (with the lock held)."""
    staged = directory / _STAGED
    if staged.is_dir():
        for name in (_KEY, _CERT):
            with contextlib.suppress(FileNotFoundError):  # moved before a crash
                os.replace(staged / name, directory / name)
        _fsync_directory(directory)
        staged.rmdir()
    _finish_legacy_installation(directory)
    for stale in directory.glob(_TEMPORARIES):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def _finish_legacy_installation(directory: pathlib.Path) -> None:
    """Install the certificate an earlier version left beside its key.

    Earlier versions renamed C{.ca.key.*.tmp}, then C{.ca.pem.*.tmp} into
    place: a crash between the two left C{ca.key} and the complete
    certificate, and every start refused the half pair.
    """
    key_path, cert_path = directory / _KEY, directory / _CERT
    if cert_path.exists() or not key_path.exists():
        return
    try:
        public_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None).public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return  # refused, with the reason, once loaded
    for candidate in directory.glob(".ca.pem.*.tmp"):
        with contextlib.suppress(ValueError):
            if x509.load_pem_x509_certificate(candidate.read_bytes()).public_key() == public_key:
                os.replace(candidate, cert_path)
                return


def _install(directory: pathlib.Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Replace the named C{files} (content, mode) in the locked C{directory} all or nothing, even on a crash."""
    temporary: pathlib.Path | None = None
    try:
        temporary = pathlib.Path(tempfile.mkdtemp(prefix=".ca.", suffix=".tmp", dir=directory))
        for name, (data, mode) in files.items():
            _write_new(temporary / name, data, mode)
        _fsync_directory(temporary)
        os.rename(temporary, directory / _STAGED)  # the commit point
        temporary = None
        _fsync_directory(directory)
        _recover(directory)
    except OSError as e:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise CAError(f"cannot create CA in {directory}: {e.strerror}") from None


def _fsync_directory(directory: pathlib.Path) -> None:
    """Make the renames in C{directory} durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
