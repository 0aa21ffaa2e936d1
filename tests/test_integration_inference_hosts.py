"""The providers' own hosts as C{inference: true} intercept entries: SDKs keep their default base URL.

The openai and anthropic SDKs are built without C{base_url}, so they talk to
C{https://api.openai.com/v1} and C{https://api.anthropic.com}; their only way
out is the proxy (an httpx client with the proxy set, trusting navtwist's CA
only, C{trust_env} off).  navtwist answers CONNECT to these hosts itself,
without resolving them, and the router sends each call to the local test
upstream: no byte goes to the real providers.  The policy has no C{allow}
list, so a CONNECT that were not intercepted would be refused, not tunnelled.
These tests also pass in a loopback-only network namespace
(C{unshare -n sh -c 'ip link set lo up && pytest ...'}).
"""
from __future__ import annotations

import json
import ssl
import time
from typing import Any, Iterator

import pytest

from conftest import TIMEOUT, Proxy, ProxyStarter
from upstream import (
    ANTHROPIC_KEY,
    ANTHROPIC_MODEL,
    OPENAI_KEY,
    OPENAI_MODEL,
    Stream,
    Upstream,
    anthropic_message_events,
    openai_chat_events,
    routes_config,
    tokens,
)

pytestmark = pytest.mark.integration

INTERVAL = 0.15  # between upstream events
MESSAGES = [{"role": "user", "content": "hi"}]
PROVIDER_HOSTS = [{"host": "api.openai.com", "inference": True}, {"host": "api.anthropic.com", "inference": True}]


@pytest.fixture
def provider_proxy(start_proxy: ProxyStarter, upstream: Upstream) -> Proxy:
    return start_proxy({**routes_config(upstream.url), "policy": {"intercept": PROVIDER_HOSTS}})


@pytest.fixture
def sent() -> list[Any]:
    """The requests the SDK sent, as httpx2 saw them."""
    return []


@pytest.fixture
def http(provider_proxy: Proxy, sent: list[Any]) -> Iterator[Any]:
    import httpx2

    with httpx2.Client(proxy=provider_proxy.url, verify=ssl.create_default_context(cafile=str(provider_proxy.ca_path)),
                       timeout=TIMEOUT, trust_env=False, event_hooks={"request": [sent.append]}) as client:
        yield client


def test_openai_sdk_with_its_default_base_url_is_routed_swapped_and_streamed(
    upstream: Upstream, http: Any, sent: list[Any], provider_proxy: Proxy
) -> None:
    import openai

    client = openai.OpenAI(api_key="sk-client-secret", http_client=http, max_retries=0, timeout=TIMEOUT)
    parts = tokens(8)
    upstream.script = Stream(events=openai_chat_events(parts), interval=INTERVAL)
    stream = client.chat.completions.create(model="gpt-client", messages=MESSAGES, stream=True)
    arrivals = [(chunk.choices[0].delta.content, time.monotonic()) for chunk in stream
                if chunk.choices and chunk.choices[0].delta.content]

    assert str(sent[-1].url) == "https://api.openai.com/v1/chat/completions"
    assert "".join(text for text, _ in arrivals) == "".join(parts)
    exchange = upstream.only()
    assert arrivals[0][1] < exchange.sent_at(parts[-1]), "the first token arrived only after the upstream sent the last"
    assert arrivals[-1][1] - arrivals[0][1] > (len(parts) - 2) * INTERVAL, "the stream arrived in one burst"
    assert (exchange.method, exchange.path) == ("POST", "/v1/chat/completions")
    assert exchange.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "sk-client-secret" not in json.dumps(exchange.headers) + exchange.body.decode()
    assert exchange.json()["model"] == OPENAI_MODEL


def test_anthropic_sdk_with_its_default_base_url_is_routed_swapped_and_streamed(
    upstream: Upstream, http: Any, sent: list[Any]
) -> None:
    import anthropic

    client = anthropic.Anthropic(api_key="sk-ant-client", http_client=http, max_retries=0, timeout=TIMEOUT)
    parts = tokens(6)
    upstream.script = Stream(events=anthropic_message_events(parts), interval=INTERVAL)
    with client.messages.stream(model="claude-client", max_tokens=64, messages=MESSAGES) as stream:
        arrivals = [(text, time.monotonic()) for text in stream.text_stream]
        message = stream.get_final_message()

    assert str(sent[-1].url) == "https://api.anthropic.com/v1/messages"
    assert message.content[0].text == "".join(parts)
    exchange = upstream.only()
    assert arrivals[0][1] < exchange.sent_at(parts[-1]), "the first token arrived only after the upstream sent the last"
    assert arrivals[-1][1] - arrivals[0][1] > (len(parts) - 2) * INTERVAL, "the stream arrived in one burst"
    assert (exchange.method, exchange.path) == ("POST", "/v1/messages")
    assert exchange.headers["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in exchange.headers
    assert "sk-ant-client" not in json.dumps(exchange.headers) + exchange.body.decode()
    assert exchange.json()["model"] == ANTHROPIC_MODEL


def test_other_provider_hosts_are_not_reachable(http: Any, upstream: Upstream) -> None:
    """Only the listed hosts are answered: a neighbour of theirs is refused at CONNECT, never dialled."""
    import httpx2

    with pytest.raises(httpx2.ProxyError, match="403"):
        http.get("https://files.openai.com/v1/files")
    assert upstream.exchanges == []
