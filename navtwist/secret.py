"""The one path every injected secret takes: read, kept over a reload, put on the wire.

navtwist sends two kinds of secrets the sandbox never sees: an inference
route's key (C{api_key} / C{api_key_env}), set as the provider's auth header,
and a C{credentials:} entry's secret, swapped for its placeholder on an
intercepted request.  Both go through this module, so each rule is written
once: where a secret is read and what it may hold (L{read_secret},
L{checked}), what a reload does when it became unreadable (L{read_or_keep}),
and the bytes it becomes in a request (L{wire_bytes}).

No secret appears in an exception or a warning: they name the key path and
the variable or file, never the value.
"""
from __future__ import annotations

from typing import Mapping

MAX_SECRET_FILE_BYTES = 64 * 1024  # far beyond any token; a header could not carry more


class CredentialError(ValueError):
    """One line naming the key path or the credential, never a secret.

    A C{ValueError}, like the policy's errors, so the config loader can turn
    it into a C{ConfigError} without this module importing the config.
    """


class SecretMissing(CredentialError):
    """The source holds no secret (unset, empty, or a file of blanks): the
    one failure a tool that never calls an upstream may go on without."""


def read_secret(source: str, location: str, environ: Mapping[str, str], where: str) -> str:
    """The secret from environment variable (C{source} C{"env"}) or file
    (C{"file"}) C{location}, surrounding whitespace (a file's final newline)
    removed.

    @raise SecretMissing: when it is unset or empty.
    @raise CredentialError: when it is unreadable, too large, or not L{checked}.
    """
    described = f"{where}: secret from {source} {location}"
    if source == "env":
        if location not in environ:
            raise SecretMissing(f"{described} is not set")
        text = environ[location]
    else:
        try:
            with open(location, "rb") as f:
                data = f.read(MAX_SECRET_FILE_BYTES + 1)
        except OSError as exc:
            raise CredentialError(f"{described} cannot be read: {exc.strerror}") from None
        if len(data) > MAX_SECRET_FILE_BYTES:
            raise CredentialError(f"{described} is larger than {MAX_SECRET_FILE_BYTES} bytes")
        text = data.decode("latin-1")  # checked to be ASCII below
    return checked(text.strip(), described)


def checked(secret: str, described: str) -> str:
    """C{secret}, if a request can carry it: non-empty printable ASCII
    without spaces (CR/LF would forge headers; other bytes would not survive
    every position).  C{described} starts the error line.

    @raise SecretMissing: when it is empty.
    @raise CredentialError: for any other character.
    """
    if not secret:
        raise SecretMissing(f"{described} is empty")
    if not _header_safe(secret):
        raise CredentialError(f"{described} contains whitespace, control or non-ASCII characters")
    return secret


def read_or_keep(
    source: str, location: str, environ: Mapping[str, str], where: str, previous: str | None
) -> tuple[str, str | None]:
    """L{read_secret}, and None; or, when that fails on a reload, the secret
    in use and the warning line to log.

    C{previous} is the secret in use read from this same source and
    location (the caller matches them), None on a start: a rotation that
    goes wrong keeps traffic flowing on the old value rather than failing
    the reload or sending nothing.

    @raise CredentialError: when the secret cannot be read and there is no C{previous}.
    """
    try:
        return read_secret(source, location, environ, where), None
    except CredentialError as exc:
        if previous is None:
            raise
        return previous, f"{exc}; keeping the previous value"


def wire_bytes(secret: str) -> bytes:
    """The bytes C{secret} is sent as: a route's auth header and every
    placeholder's replacement are made of these.

    Checked again here, at injection, so a secret that did not come through
    the config (a plugin's, a test's) cannot forge a header either: fail closed.

    @raise CredentialError: naming no value, when it is empty or not L{checked}.
    """
    if not secret or not _header_safe(secret):
        raise CredentialError("refusing to inject a secret that is empty or holds whitespace, control or non-ASCII characters")
    return secret.encode("ascii")


def _header_safe(secret: str) -> bool:
    return all("!" <= c <= "~" for c in secret)
