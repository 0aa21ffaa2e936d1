"""The built-in provider profiles, shipped as plugins like any third-party one."""
from navtwist.providers import ProviderProfile

_OPENAI_STYLE = frozenset({b"openai-organization", b"openai-project", b"x-model-id"})

openai = ProviderProfile("openai", passthrough_headers=_OPENAI_STYLE)
nvidia = ProviderProfile("nvidia", passthrough_headers=_OPENAI_STYLE)
deepinfra = ProviderProfile("deepinfra", passthrough_headers=_OPENAI_STYLE)
anthropic = ProviderProfile(
    "anthropic",
    auth_header=b"x-api-key",
    auth_scheme=b"",
    passthrough_headers=frozenset({b"anthropic-version", b"anthropic-beta"}),
    default_headers=((b"anthropic-version", b"2023-06-01"),),
)
