"""Claude Code (`claude --print`) streams through navtwist, and reports a cut stream as an error."""
from __future__ import annotations

from typing import Any

import pytest

from agent_clients import AGENTS, Run, agent_proxy, client_env, figures, modules, record_figures, run_client, workdir  # noqa: F401 - fixtures
from upstream import Stream, anthropic_message_events, tokens

pytestmark = AGENTS

PARTS = tokens(8)
INTERVAL = 0.3


def _claude(env: dict[str, str], workdir) -> tuple[Run, list[dict[str, Any]]]:  # type: ignore[no-untyped-def]
    env = {
        **env,
        # Claude Code's own way to a gateway: the Messages API at inference.local, a key navtwist replaces.
        "ANTHROPIC_BASE_URL": "https://inference.local",
        "ANTHROPIC_API_KEY": "sk-ant-client-placeholder",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # no telemetry, error reporting or update checks
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "CLAUDE_CODE_DISABLE_NONSTREAMING_FALLBACK": "1",  # a cut stream is an error, not retried without streaming
    }
    argv = ["claude", "--print", "--output-format", "stream-json", "--verbose", "--include-partial-messages",
            "--max-turns", "1", "Say hello."]
    run = run_client(argv, env, workdir)
    return run, run.json_events()


def _text_deltas(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event.get("type") == "stream_event"
            and event["event"].get("type") == "content_block_delta"
            and event["event"]["delta"].get("type") == "text_delta"]


def test_streamed_answer_arrives_as_it_is_produced(upstream, client_env, workdir) -> None:  # type: ignore[no-untyped-def]
    upstream.script = Stream(events=anthropic_message_events(PARTS), interval=INTERVAL)
    run, events = _claude(client_env, workdir)
    assert run.returncode == 0, (run.stdout, run.stderr, [(e.method, e.path) for e in upstream.exchanges])
    deltas = _text_deltas(events)
    assert "".join(event["event"]["delta"]["text"] for event in deltas) == "".join(PARTS)
    first, last = deltas[0]["_at"], deltas[-1]["_at"]
    record_figures("claude-code", first, last, run.elapsed)
    assert last - first >= 0.7 * INTERVAL * (len(PARTS) - 1), (first, last)
    result = events[-1]
    assert result["type"] == "result" and result["subtype"] == "success" and result["result"] == "".join(PARTS)


def test_a_stream_cut_upstream_is_reported_as_an_error(upstream, client_env, workdir) -> None:  # type: ignore[no-untyped-def]
    upstream.script = Stream(events=anthropic_message_events(PARTS), interval=0.05, die_after=4)
    run, events = _claude(client_env, workdir)
    assert run.returncode != 0, (run.stdout, run.stderr)
    assert _text_deltas(events), "some text arrived before the cut"
    result = events[-1]
    # navtwist's SSE error event, as Claude Code words it: "API Error: response truncated: upstream connection lost".
    assert result["type"] == "result" and result["is_error"] is True, result
    assert "API Error: response truncated" in result["result"], result["result"]
    assert len(upstream.exchanges) == 1, "reported, not retried"
