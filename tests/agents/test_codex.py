"""The Codex CLI (`codex exec`) streams through navtwist (Responses API), and reports a cut stream as an error."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import pytest

from agent_clients import AGENTS, Run, agent_proxy, client_env, figures, modules, record_figures, run_client, workdir  # noqa: F401 - fixtures
from routing_helpers import wait_for_records
from upstream import OPENAI_MODEL, ByPath, Json, Stream, sse, tokens

pytestmark = AGENTS

PARTS = tokens(8)
INTERVAL = 0.3

# A custom provider at inference.local: Codex follows HTTPS_PROXY and trusts SSL_CERT_FILE / CODEX_CA_CERTIFICATE.
CONFIG = """\
model = "navtwist-model"
model_provider = "navtwist"

[model_providers.navtwist]
name = "navtwist"
base_url = "https://inference.local/v1"
env_key = "OPENAI_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 20000
"""


def responses_events(parts: Iterable[str], model: str = OPENAI_MODEL) -> tuple[bytes, ...]:
    """A streamed Responses API answer whose output text is C{parts}."""
    parts = list(parts)
    text = "".join(parts)
    response = {"id": "resp_up", "object": "response", "created_at": 1700000000, "model": model,
                "status": "in_progress", "output": []}
    item = {"id": "msg_up", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    done_item = {**item, "status": "completed",
                 "content": [{"type": "output_text", "text": text, "annotations": []}]}
    usage = {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": len(parts),
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 3 + len(parts)}

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, **fields}, kind)

    return (
        event("response.created", response=response),
        event("response.output_item.added", output_index=0, item=item),
        event("response.content_part.added", item_id="msg_up", output_index=0, content_index=0,
              part={"type": "output_text", "text": "", "annotations": []}),
        *(event("response.output_text.delta", item_id="msg_up", output_index=0, content_index=0, delta=part)
          for part in parts),
        event("response.output_text.done", item_id="msg_up", output_index=0, content_index=0, text=text),
        event("response.output_item.done", output_index=0, item=done_item),
        event("response.completed", response={**response, "status": "completed", "output": [done_item],
                                               "usage": usage}),
    )


def _codex(env: dict[str, str], proxy: Any, workdir: Path) -> tuple[Run, list[dict[str, Any]]]:
    home = Path(env["HOME"]) / ".codex"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(CONFIG)
    env = {**env, "CODEX_HOME": str(home), "OPENAI_API_KEY": "sk-client-placeholder",
           "CODEX_CA_CERTIFICATE": str(proxy.ca_path)}
    argv = ["codex", "exec", "--json", "--skip-git-repo-check", "--sandbox", "read-only", "Say hello."]
    run = run_client(argv, env, workdir)
    return run, run.json_events()


def _script(stream: Stream) -> ByPath:
    return ByPath(paths={"/v1/models": Json(body={"object": "list", "data": []})}, default=stream)


def test_streamed_answer(upstream, client_env, agent_proxy, workdir) -> None:  # type: ignore[no-untyped-def]
    upstream.script = _script(Stream(events=responses_events(PARTS), interval=INTERVAL))
    run, events = _codex(client_env, agent_proxy, workdir)
    assert run.returncode == 0, (run.stdout, run.stderr, [(e.method, e.path) for e in upstream.exchanges])
    messages = [event for event in events if event.get("type") == "item.completed"
                and event["item"].get("type") == "agent_message"]
    assert messages and messages[-1]["item"]["text"] == "".join(PARTS), events
    calls = [e for e in upstream.exchanges if e.path.startswith("/v1/responses")]
    assert calls and calls[-1].json()["stream"] is True
    # `codex exec` prints the message only once it is complete, so the first text's time is
    # taken from navtwist's request record: when it relayed the first content event.
    record = wait_for_records(agent_proxy, 1)[-1]
    ttft, duration = float(record["ttft_ms"]) / 1000, float(record["duration_ms"]) / 1000
    record_figures("codex (navtwist log)", ttft, duration, run.elapsed)
    assert duration - ttft >= 0.7 * INTERVAL * (len(PARTS) - 1), record


def test_a_stream_cut_upstream_is_reported_as_an_error(upstream, client_env, agent_proxy, workdir) -> None:  # type: ignore[no-untyped-def]
    upstream.script = _script(Stream(events=responses_events(PARTS), interval=0.05, die_after=4))
    run, events = _codex(client_env, agent_proxy, workdir)
    assert run.returncode != 0, (run.stdout, run.stderr)
    failed = [event for event in events if event.get("type") == "turn.failed"]
    assert failed and "stream" in failed[-1]["error"]["message"], (run.stdout, run.stderr)
    assert len([e for e in upstream.exchanges if e.path.startswith("/v1/responses")]) == 1, "reported, not retried"
