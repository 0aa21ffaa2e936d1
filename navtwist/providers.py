"""Built-in provider profiles: how each upstream vendor wants its key and headers."""
from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import implementer

from navtwist.interfaces import IProviderProfile

DEFAULT_PROVIDER = "openai"


@implementer(IProviderProfile)
@dataclass(frozen=True)
class ProviderProfile:
    """A provider that sends its key in one header, optionally with a scheme prefix."""

    name: str
    auth_header: bytes = b"authorization"
    auth_scheme: bytes = b"Bearer "
    passthrough_headers: frozenset[bytes] = frozenset()
    default_headers: tuple[tuple[bytes, bytes], ...] = field(default=())

    def auth_headers(self, api_key: str) -> list[tuple[bytes, bytes]]:
        if not api_key:
            return []
        return [(self.auth_header, self.auth_scheme + api_key.encode("utf-8"))]


_OPENAI_STYLE_PASSTHROUGH = frozenset({b"openai-organization", b"openai-project", b"x-model-id"})

BUILTIN_PROVIDERS: dict[str, ProviderProfile] = {
    p.name: p
    for p in (
        ProviderProfile("openai", passthrough_headers=_OPENAI_STYLE_PASSTHROUGH),
        ProviderProfile("nvidia", passthrough_headers=_OPENAI_STYLE_PASSTHROUGH),
        ProviderProfile("deepinfra", passthrough_headers=_OPENAI_STYLE_PASSTHROUGH),
        ProviderProfile(
            "anthropic",
            auth_header=b"x-api-key",
            auth_scheme=b"",
            passthrough_headers=frozenset({b"anthropic-version", b"anthropic-beta"}),
            default_headers=((b"anthropic-version", b"2023-06-01"),),
        ),
    )
}


def get_provider(name: str | None) -> ProviderProfile:
    """The profile for C{name}; no name means OpenAI-style Bearer auth.

    @raise KeyError: for an unknown provider type.
    """
    return BUILTIN_PROVIDERS[name or DEFAULT_PROVIDER]
