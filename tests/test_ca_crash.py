"""Crash safety of the CA's files (issue #11).

The process creating or rotating the CA is killed, or sees an I/O error, at
every system call that changes the CA directory; the next start must find
exactly one valid pair -- the committed one if the crash came after the
commit -- and no temporary holding a private key.  strace injects the faults:
C{-e inject=SYSCALL:signal=SIGKILL:when=N} kills the process as it enters its
Nth call of SYSCALL.  Each loop raises N until the process completes.
"""
from __future__ import annotations

import itertools
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from navtwist.ca import CertificateAuthority

STRACE = shutil.which("strace")
TIMEOUT = 60  # seconds per faulted process
PERMITTED = ("inference.local", "10.0.0.1")
# The calls that change the directory's state while a pair is made and installed.
STEPS = ("mkdir", "write", "fsync", "rename", "rmdir")
# -B: Python writes no bytecode, so every faulted call is the CA code's own.
CHILD = (
    "import sys; from navtwist.ca import CertificateAuthority as CA; "
    f"getattr(CA, sys.argv[1])(sys.argv[2], permitted={PERMITTED!r})"
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get install strace): it injects the faults"),
]


@pytest.fixture(scope="module", autouse=True)
def strace_can_inject() -> None:
    probe = faulted(["-c", "import os; os.rename('/nonexistent-a', '/nonexistent-b')"], "rename:signal=SIGKILL:when=1")
    if probe.returncode != -signal.SIGKILL:
        pytest.skip(f"strace cannot inject faults here (is ptrace allowed?): {probe.stderr.strip()}")


def faulted(python_args: list[str], fault: str) -> subprocess.CompletedProcess[str]:
    assert STRACE is not None
    return subprocess.run(
        [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"inject={fault}", sys.executable, "-B", *python_args],
        capture_output=True, text=True, timeout=TIMEOUT,
    )


def run_ca(operation: str, directory: Path, fault: str) -> subprocess.CompletedProcess[str]:
    return faulted(["-c", CHILD, operation, str(directory)], fault)


def committed_key(directory: Path) -> bytes | None:
    """The key the next start must end up with: the staged one, else the one in place (None: any)."""
    for path in (directory / ".ca.new" / "ca.key", directory / "ca.key"):
        if path.exists():
            return path.read_bytes()
    return None


def assert_next_start_recovers(directory: Path, expected_key: bytes | None) -> None:
    ca = CertificateAuthority.load_or_create(directory, permitted=PERMITTED)
    key_pem = (directory / "ca.key").read_bytes()
    if expected_key is not None:
        assert key_pem == expected_key
    key = serialization.load_pem_private_key(key_pem, password=None)
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    assert key.public_key() == cert.public_key()
    assert ca.certificate_pem() == (directory / "ca.pem").read_bytes()
    assert ca.covers(PERMITTED) is None and not ca.unconstrained
    assert sorted(p.name for p in directory.iterdir()) == ["ca.key", "ca.pem"]  # no .tmp, no .ca.new
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "ca.pem").stat().st_mode) == 0o644


def half_installed(directory: Path) -> bool:
    """ca.key without ca.pem, or a key that does not match ca.pem: what used to stop every start."""
    if not (directory / "ca.key").exists():
        return False
    if not (directory / "ca.pem").exists():
        return True
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    return key.public_key() != x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes()).public_key()


@pytest.mark.parametrize("operation", ["load_or_create", "rotate"])
@pytest.mark.parametrize("step", STEPS)
def test_killed_at_every_step_the_next_start_finds_one_valid_pair(tmp_path, operation, step):
    kills = half_installed_seen = 0
    for n in itertools.count(1):
        directory = tmp_path / str(n) / "ca"
        if operation == "rotate":
            CertificateAuthority.load_or_create(directory, permitted=PERMITTED)  # the CA being replaced
        result = run_ca(operation, directory, f"{step}:signal=SIGKILL:when={n}")
        if result.returncode == 0:
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
        kills += 1
        half_installed_seen += half_installed(directory)
        assert_next_start_recovers(directory, committed_key(directory))
    assert kills >= 1, f"no {step} call to kill"
    if step == "rename":  # the window of issue #11, between installing the key and the certificate
        assert half_installed_seen
    assert_next_start_recovers(directory, (directory / "ca.key").read_bytes())


@pytest.mark.parametrize("step", ["write", "fsync", "rename"])
def test_io_error_at_every_step_leaves_no_private_key_behind(tmp_path, step):
    errors = 0
    for n in itertools.count(1):
        directory = tmp_path / str(n) / "ca"
        result = run_ca("load_or_create", directory, f"{step}:error=EIO:when={n}")
        if result.returncode == 0:
            break
        errors += 1
        last_line = result.stderr.strip().splitlines()[-1]
        assert last_line == f"navtwist.ca.CAError: cannot create CA in {directory}: Input/output error"
        assert list(directory.glob(".ca.*.tmp")) == []  # removed by the failing process itself
        assert_next_start_recovers(directory, committed_key(directory))
    assert errors >= 1, f"no {step} call to fail"


@pytest.mark.parametrize("step", ["rename", "fsync", "rmdir", "unlink", "unlinkat"])
def test_recovery_itself_survives_being_killed_at_every_step(tmp_path, step):
    """A start killed while it finishes a committed installation and deletes stale temporaries."""
    crashed = tmp_path / "crashed"
    # The second rename moves the key into place: killed there, the pair is committed and staged.
    assert run_ca("load_or_create", crashed, "rename:signal=SIGKILL:when=2").returncode == -signal.SIGKILL
    staged_key = (crashed / ".ca.new" / "ca.key").read_bytes()
    (crashed / ".ca.key.0123abcd.tmp").write_bytes(b"left by an earlier version")
    (crashed / ".ca.x1y2z3.tmp").mkdir()
    (crashed / ".ca.x1y2z3.tmp" / "ca.key").write_bytes(b"an uncommitted key")
    kills = 0
    for n in itertools.count(1):
        directory = tmp_path / str(n)
        shutil.copytree(crashed, directory)
        result = run_ca("load_or_create", directory, f"{step}:signal=SIGKILL:when={n}")
        if result.returncode == 0:
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
        kills += 1
        assert_next_start_recovers(directory, staged_key)
    assert kills >= 1, f"no {step} call to kill"
    assert_next_start_recovers(directory, staged_key)
