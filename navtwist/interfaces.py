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

    def url(endpoint: str, uri: bytes) -> bytes:
        """The upstream URL for request-target C{uri} on a route's C{endpoint}."""


class IRequestHook(Interface):
    """Sees each inference request before it goes upstream; may change or refuse it.

    Enabled by name in the config's C{plugins:} list.
    """

    name = Attribute("The name that enables this hook in C{plugins:} (str).")

    def before_upstream(request: object) -> object:
        """Inspect or change C{request}, a L{navtwist.inference.hooks.InferenceRequest}
        (protocol, route, client_model, mutable JSON C{document}, mutable
        extra upstream C{headers}).  Return None to go on, or a
        L{navtwist.outcome.Refusal} (status, code, message) to answer the
        client with it instead, in its SDK's error shape.  An exception is
        logged and answered with a 500.
        """


class IStreamObserver(Interface):
    """Watches responses as they are relayed: for auditing and custom metrics.

    Methods must not block and must not keep chunks: they see every byte of
    every response.  An exception is logged and the response goes on.
    Enabled by name in the config's C{plugins:} list.
    """

    name = Attribute("The name that enables this observer in C{plugins:} (str).")

    def response_started(info: object) -> None:
        """The response head went out; C{info} is the request's L{navtwist.inference.hooks.InferenceRequest}."""

    def chunk(info: object, data: bytes) -> None:
        """C{data} was just written to the client (read-only)."""

    def response_ended(info: object, record: object) -> None:
        """The exchange is over; C{record} is its usage record (a mapping)."""
