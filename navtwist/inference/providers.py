"""Provider profiles: how each upstream vendor wants its key, headers and URLs.

The built-in profiles are defined here and always present; third-party
profiles are discovered as L{IProviderProfile} plugins in the
C{navtwist.plugins} package and may add names (never shadow a built-in).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from urllib.parse import urlsplit

from twisted.plugin import IPlugin, getPlugins
from zope.interface import implementer

from navtwist.interfaces import IProviderProfile
from navtwist.secret import wire_bytes

DEFAULT_PROVIDER = "openai"


def openshell_url(endpoint: str, uri: bytes) -> bytes:
    """The upstream URL for request-target C{uri} on a route's C{endpoint}.

    An endpoint whose path ends in C{/v1} or starts with C{/v1/} already names
    the API version, so the request's leading C{/v1} is dropped (OpenShell's
    rule).  The query string is kept.
    """
    parts = urlsplit(endpoint)
    endpoint_path = parts.path.rstrip("/")
    base = f"{parts.scheme}://{parts.netloc}{endpoint_path}"
    path, sep, query = uri.partition(b"?")
    if (endpoint_path.endswith("/v1") or endpoint_path.startswith("/v1/")) and path.startswith(b"/v1/"):
        path = path[len(b"/v1"):]
    return base.encode("ascii") + path + sep + query


@implementer(IPlugin, IProviderProfile)
@dataclass(frozen=True)
class ProviderProfile:
    """A provider that sends its key in one header, optionally with a scheme prefix."""

    name: str
    auth_header: bytes = b"authorization"
    auth_scheme: bytes = b"Bearer "
    passthrough_headers: frozenset[bytes] = frozenset()
    default_headers: tuple[tuple[bytes, bytes], ...] = field(default=())

    def auth_headers(self, api_key: str) -> list[tuple[bytes, bytes]]:
        """The key after the scheme, in the bytes every injected secret is
        sent as (the credentials' placeholders are replaced by the same)."""
        if not api_key:
            return []
        return [(self.auth_header, self.auth_scheme + wire_bytes(api_key))]

    def url(self, endpoint: str, uri: bytes) -> bytes:
        return openshell_url(endpoint, uri)


_OPENAI_STYLE = frozenset({b"openai-organization", b"openai-project", b"x-model-id"})

BUILTIN: tuple[ProviderProfile, ...] = (
    ProviderProfile("openai", passthrough_headers=_OPENAI_STYLE),
    ProviderProfile("nvidia", passthrough_headers=_OPENAI_STYLE),
    ProviderProfile("deepinfra", passthrough_headers=_OPENAI_STYLE),
    ProviderProfile(
        "anthropic",
        auth_header=b"x-api-key",
        auth_scheme=b"",
        passthrough_headers=frozenset({b"anthropic-version", b"anthropic-beta"}),
        default_headers=((b"anthropic-version", b"2023-06-01"),),
    ),
)


@cache
def providers() -> dict[str, IProviderProfile]:
    """Every provider profile, by name: the built-in ones, then the plugins'.

    A plugin cannot replace a built-in profile: a stray dropin must not
    change where the route's key is sent.
    """
    import navtwist.plugins

    found: dict[str, IProviderProfile] = {}
    for profile in getPlugins(IProviderProfile, navtwist.plugins):
        found.setdefault(profile.name, profile)
    found.update((profile.name, profile) for profile in BUILTIN)
    return found


def get_provider(name: str | None) -> IProviderProfile:
    """The profile for C{name}; no name means OpenAI-style Bearer auth.

    @raise KeyError: for an unknown provider type.
    """
    return providers()[name or DEFAULT_PROVIDER]
