"""The inference protocols navtwist recognises, and how a request is mapped to one.

Detection uses the method and the exact path (query string ignored), as the
reference proxy did, so that nothing unexpected reaches an upstream.
"""
from __future__ import annotations

OPENAI_CHAT_COMPLETIONS = "openai_chat_completions"
OPENAI_COMPLETIONS = "openai_completions"
OPENAI_RESPONSES = "openai_responses"
OPENAI_EMBEDDINGS = "openai_embeddings"
ANTHROPIC_MESSAGES = "anthropic_messages"
MODEL_DISCOVERY = "model_discovery"

PROTOCOLS: tuple[str, ...] = (
    OPENAI_CHAT_COMPLETIONS,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
    OPENAI_EMBEDDINGS,
    ANTHROPIC_MESSAGES,
    MODEL_DISCOVERY,
)

# Protocols whose responses are token streams (relayed chunk by chunk with
# chunked encoding); the others are small JSON documents kept as they are.
STREAMING_PROTOCOLS: frozenset[str] = frozenset(
    {OPENAI_CHAT_COMPLETIONS, OPENAI_COMPLETIONS, OPENAI_RESPONSES, ANTHROPIC_MESSAGES}
)

# Anthropic's token counter (Claude Code calls it): routed like messages, never streamed.
COUNT_TOKENS_PATH = b"/v1/messages/count_tokens"

_POST_PATHS: dict[bytes, str] = {
    b"/v1/chat/completions": OPENAI_CHAT_COMPLETIONS,
    b"/v1/completions": OPENAI_COMPLETIONS,
    b"/v1/responses": OPENAI_RESPONSES,
    b"/v1/messages": ANTHROPIC_MESSAGES,
    b"/v1/messages/count_tokens": ANTHROPIC_MESSAGES,
    b"/v1/embeddings": OPENAI_EMBEDDINGS,
}


def detect(method: bytes, path: bytes) -> str | None:
    """Return the protocol for C{method} and C{path} (without query), or None."""
    if method == b"POST":
        return _POST_PATHS.get(path)
    if method == b"GET":
        if path == b"/v1/models":
            return MODEL_DISCOVERY
        prefix = b"/v1/models/"
        if path.startswith(prefix) and len(path) > len(prefix):
            return MODEL_DISCOVERY
    return None


def is_anthropic(protocol: str) -> bool:
    """Errors for Anthropic clients use Anthropic's error shape."""
    return protocol == ANTHROPIC_MESSAGES


def anthropic_client(path: bytes, anthropic_version: bool) -> bool:
    """Whether the client that sent a request to C{path} reads Anthropic's error shape:
    it calls an Anthropic path or sends C{anthropic-version} (every Anthropic SDK does)."""
    return anthropic_version or path == b"/v1/messages" or path.startswith(b"/v1/messages/")
