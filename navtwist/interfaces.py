"""The zope.interface contracts navtwist is extended through."""
from __future__ import annotations

from zope.interface import Attribute, Interface


class IProviderProfile(Interface):
    """How one kind of upstream expects to be called: its auth style and headers.

    A new vendor is a new profile, not a change to the router.
    """

    name = Attribute("The C{provider_type} value that selects this profile (str).")
    passthrough_headers = Attribute(
        "Lower-case header names (bytes) forwarded from the client besides the "
        "common allowlist, e.g. b'anthropic-version'."
    )
    default_headers = Attribute(
        "Sequence of (name, value) bytes pairs added when the client sent no such header."
    )

    def auth_headers(api_key: str) -> list[tuple[bytes, bytes]]:
        """The header pairs that carry C{api_key} to the upstream."""
