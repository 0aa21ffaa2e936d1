"""The Node SDKs (openai, @anthropic-ai/sdk) stream through navtwist, and see a cut stream as an error."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent_clients import AGENTS, HERE, Run, agent_proxy, client_env, figures, modules, record_figures, run_client, workdir  # noqa: F401 - fixtures
from upstream import Stream, anthropic_message_events, openai_chat_events, tokens

pytestmark = AGENTS

PARTS = tokens(8)
INTERVAL = 0.3  # between upstream events: the last text comes >= 2.1 s after the first


def _events(kind: str, parts: list[str]) -> tuple[bytes, ...]:
    return openai_chat_events(parts) if kind == "openai" else anthropic_message_events(parts)


def _sdk(kind: str, env: dict[str, str], workdir: Path) -> tuple[Run, list[dict[str, Any]]]:
    run = run_client(["node", str(HERE / "sdk_stream.cjs"), kind], env, workdir)
    return run, run.json_events()


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_streamed_answer_arrives_as_it_is_produced(kind: str, upstream, client_env, workdir) -> None:  # type: ignore[no-untyped-def]
    upstream.script = Stream(events=_events(kind, PARTS), interval=INTERVAL)
    run, events = _sdk(kind, client_env, workdir)
    assert run.returncode == 0, (run.stdout, run.stderr)
    texts = [event for event in events if "text" in event]
    assert "".join(event["text"] for event in texts) == "".join(PARTS)
    first, last = texts[0]["t"], texts[-1]["t"]
    record_figures(f"node {kind} sdk", first, last, run.elapsed)
    # Streamed, not buffered: the last text came about (n-1) intervals after the first.
    assert last - first >= 0.7 * INTERVAL * (len(PARTS) - 1), (first, last)
    assert events[-1].get("done") is True
    assert not any("placeholder" in value for value in upstream.only().headers.values()), "the route's key is sent"


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_stream_cut_upstream_is_reported_as_an_error(kind: str, upstream, client_env, workdir) -> None:  # type: ignore[no-untyped-def]
    upstream.script = Stream(events=_events(kind, PARTS), interval=0.05, die_after=4)
    run, events = _sdk(kind, client_env, workdir)
    assert run.returncode == 3, (run.stdout, run.stderr)
    assert any("text" in event for event in events), "some text arrived before the cut"
    assert "error" in events[-1], events
