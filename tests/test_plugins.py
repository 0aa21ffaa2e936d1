"""zope.interface plugins: discovery, enabling by name, request hooks, stream observers,
provider profiles — and isolation when a plugin fails."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from twisted.logger import globalLogPublisher
from twisted.plugin import IPlugin
from zope.interface import implementer

import navtwist.plugins
from navtwist.testing import FakeResponse, Harness, make_harness
from navtwist.inference import hooks, providers
from navtwist.config import ConfigError, parse_config
from navtwist.inference.hooks import InferenceRequest
from navtwist.outcome import Refusal
from navtwist.interfaces import IRequestHook, IStreamObserver
from navtwist.plugins.cap_max_tokens import cap_max_tokens
from navtwist.plugins.stream_audit import stream_audit
from navtwist.inference.router import Extensions

ROUTES = {"routes": [{"name": "r", "endpoint": "http://up.test/v1", "model": "m", "api_key": "k",
                      "protocols": ["openai_chat_completions", "anthropic_messages"]}]}
CHAT = json.dumps({"model": "x", "stream": True, "max_tokens": 100000, "messages": []}).encode()


@implementer(IRequestHook)
class Scripted:
    name = "scripted"

    def __init__(self, action) -> None:  # type: ignore[no-untyped-def]
        self.action = action
        self.seen: list[InferenceRequest] = []

    def before_upstream(self, request: InferenceRequest):  # type: ignore[no-untyped-def]
        self.seen.append(request)
        return self.action(request)


@implementer(IStreamObserver)
class Recorder:
    name = "recorder"

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail_on = fail_on

    def _record(self, what: str, *args: object) -> None:
        self.calls.append((what, *args))
        if what == self.fail_on:
            raise RuntimeError("observer bug")

    def response_started(self, info: InferenceRequest) -> None:
        self._record("started", info.protocol)

    def chunk(self, info: InferenceRequest, data: bytes) -> None:
        self._record("chunk", data)

    def response_ended(self, info: InferenceRequest, record) -> None:  # type: ignore[no-untyped-def]
        self._record("ended", record["outcome"])


def _status(h: Harness) -> int:
    return int(h.output().split(b" ", 2)[1])


def test_example_plugins_are_discovered_by_name() -> None:
    assert hooks.available()["cap_max_tokens"] is cap_max_tokens
    assert hooks.available()["stream_audit"] is stream_audit
    assert hooks.select(["stream_audit", "cap_max_tokens"]) == ([cap_max_tokens], [stream_audit])


def test_builtin_providers_are_always_present_and_cannot_be_shadowed(monkeypatch: pytest.MonkeyPatch) -> None:
    from navtwist.inference.providers import ProviderProfile

    rogue = ProviderProfile("openai", auth_header=b"x-leak")
    extra = ProviderProfile("acme")
    monkeypatch.setattr(providers, "getPlugins", lambda interface, package: iter([rogue, extra]))
    providers.providers.cache_clear()
    try:
        found = providers.providers()
        assert {"openai", "nvidia", "anthropic", "deepinfra", "acme"} <= set(found)
        assert found["openai"].auth_header == b"authorization"
        assert found["acme"] is extra
    finally:
        providers.providers.cache_clear()


def test_config_enables_plugins_and_rejects_unknown_names() -> None:
    assert parse_config({**ROUTES, "plugins": ["cap_max_tokens"]}, {}).plugins == ("cap_max_tokens",)
    with pytest.raises(ConfigError, match=r"plugins\[1\]: no plugin named 'nope'"):
        parse_config({**ROUTES, "plugins": ["cap_max_tokens", "nope"]}, {})


def test_cap_max_tokens_lowers_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAVTWIST_MAX_TOKENS", "256")
    h = make_harness(ROUTES, extensions=Extensions(hooks=[cap_max_tokens]))
    h.send("POST", "/v1/chat/completions", CHAT)
    sent = json.loads(h.agent.calls[0].body)
    assert sent["max_tokens"] == 256 and sent["model"] == "m"


def test_hook_may_add_headers_but_never_override_the_key() -> None:
    def add(request: InferenceRequest) -> None:
        request.headers.setRawHeaders(b"x-tenant", [b"t1"])
        request.headers.setRawHeaders(b"authorization", [b"Bearer stolen"])

    h = make_harness(ROUTES, extensions=Extensions(hooks=[Scripted(add)]))
    h.send("POST", "/v1/chat/completions", CHAT)
    headers = h.agent.calls[0].headers
    assert headers.getRawHeaders(b"x-tenant") == [b"t1"]
    assert headers.getRawHeaders(b"authorization") == [b"Bearer k"]


@pytest.mark.parametrize("path, body, shape", [
    ("/v1/chat/completions", CHAT, "openai"),
    ("/v1/messages", b'{"model":"x","max_tokens":5,"messages":[]}', "anthropic"),
])
def test_hook_refusal_answers_in_the_clients_shape(path: str, body: bytes, shape: str) -> None:
    hook = Scripted(lambda request: Refusal(403, "model_blocked", f"model {request.client_model} is blocked"))
    h = make_harness(ROUTES, extensions=Extensions(hooks=[hook]))
    h.send("POST", path, body)
    assert _status(h) == 403 and h.agent.calls == []
    doc = json.loads(h.output().partition(b"\r\n\r\n")[2])
    message = doc["error"]["message"]
    assert message == "model x is blocked"
    assert (doc.get("type") == "error") == (shape == "anthropic")
    assert doc["error"].get("code") == (None if shape == "anthropic" else "model_blocked")
    assert hook.seen[0].protocol in ("openai_chat_completions", "anthropic_messages")


def test_failing_hook_is_a_500_and_the_proxy_keeps_serving() -> None:
    def explode(request: InferenceRequest) -> None:
        raise ValueError("hook bug with secret sk-123")

    h = make_harness(ROUTES, extensions=Extensions(hooks=[Scripted(explode)]))
    h.send("POST", "/v1/chat/completions", CHAT)
    assert _status(h) == 500 and h.agent.calls == []
    assert b"sk-123" not in h.output()
    h.send("POST", "/v1/chat/completions", CHAT)  # the same connection still works
    assert h.output().count(b"HTTP/1.1 500") == 2


def test_stream_observer_sees_start_chunks_and_end() -> None:
    recorder = Recorder()
    h = make_harness(ROUTES, extensions=Extensions(observers=[recorder]))
    h.send("POST", "/v1/chat/completions", CHAT)
    response = FakeResponse()
    h.agent.calls[0].deferred.callback(response)
    response.send(b"data: 1\n\n")
    response.send(b"data: 2\n\n")
    response.end()
    assert recorder.calls == [("started", "openai_chat_completions"), ("chunk", b"data: 1\n\n"),
                              ("chunk", b"data: 2\n\n"), ("ended", "ok")]


def test_failing_observer_is_dropped_and_the_response_goes_on() -> None:
    bad, good = Recorder(fail_on="chunk"), Recorder()
    h = make_harness(ROUTES, extensions=Extensions(observers=[bad, good]))
    h.send("POST", "/v1/chat/completions", CHAT)
    response = FakeResponse()
    h.agent.calls[0].deferred.callback(response)
    response.send(b"data: 1\n\n")
    response.send(b"data: 2\n\n")
    response.end()
    assert [c[0] for c in bad.calls] == ["started", "chunk"]
    assert [c[0] for c in good.calls] == ["started", "chunk", "chunk", "ended"]
    assert h.output().endswith(b"data: 2\n\n\r\n0\r\n\r\n")


def test_stream_audit_logs_sizes_not_content() -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = make_harness(ROUTES, extensions=Extensions(observers=[stream_audit]))
        h.send("POST", "/v1/chat/completions", CHAT)
        response = FakeResponse()
        h.agent.calls[0].deferred.callback(response)
        response.send(b"data: secret words\n\n")
        response.end()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [audit] = [e for e in events if e.get("log_namespace") == "navtwist.audit"]
    assert (audit["chunks"], audit["size"], audit["outcome"]) == (1, 20, "ok")
    assert "secret" not in json.dumps({k: v for k, v in audit.items() if isinstance(v, (str, int))})


def test_third_party_provider_dropin_needs_no_core_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dropins = tmp_path / "navtwist" / "plugins"
    dropins.mkdir(parents=True)
    (dropins / "acme_vendor.py").write_text(textwrap.dedent('''
        from navtwist.inference.providers import ProviderProfile
        acme = ProviderProfile("acme", auth_header=b"x-acme-key", auth_scheme=b"")
    '''))
    monkeypatch.setattr(navtwist.plugins, "__path__", [*navtwist.plugins.__path__, str(dropins)])
    providers.providers.cache_clear()
    try:
        config = {"routes": [{**ROUTES["routes"][0], "provider_type": "acme"}]}
        h = make_harness(config)
        h.send("POST", "/v1/chat/completions", CHAT)
        assert h.agent.calls[0].headers.getRawHeaders(b"x-acme-key") == [b"k"]
    finally:
        sys.modules.pop("navtwist.plugins.acme_vendor", None)
        monkeypatch.undo()
        providers.providers.cache_clear()


def test_plugins_declare_iplugin() -> None:
    assert IPlugin.providedBy(cap_max_tokens) and IPlugin.providedBy(stream_audit)
