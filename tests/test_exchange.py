"""The exchange's lifecycle: each candidate's concurrency slot is held exactly as
long as its call lasts, on every way a call can end; and the request record."""
from __future__ import annotations

import json
from typing import Callable

import pytest
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from navtwist.testing import FakeResponse, Harness, make_harness
from navtwist.outcome import Outcome
from navtwist.upstream.exchange import _TRANSITIONS, Phase, request_record


def _route(host: str, **extra: object) -> dict:
    return {"name": host, "endpoint": f"http://{host}/v1", "model": "m", "protocols": ["openai_chat_completions"],
            "api_key": "k", "first_byte_timeout": 30, "idle_timeout": 20, "max_concurrent": 1, **extra}


# a.test falls back on b.test; a.test sends heartbeats every 5 s.
CONFIG = {"routes": [_route("a.test", fallback=["b.test"], heartbeat=5), _route("b.test", models=["other"])]}
STREAM = json.dumps({"model": "m", "stream": True, "messages": []}).encode()


def slots(h: Harness) -> dict[str, int]:
    """The slots each route holds now, by route name."""
    return {route.name: gate.active for route, gate in h.router._gates.items()}


def answer(h: Harness, index: int, code: int = 200) -> FakeResponse:
    response = FakeResponse(code)
    h.agent.calls[index].deferred.callback(response)
    return response


def relayed_to_the_end(h: Harness) -> None:
    response = answer(h, 0)
    assert slots(h) == {"a.test": 1, "b.test": 0}  # held while the body flows
    response.send(b"data: 1\n\n")
    response.end()


def failed_then_fallback_relayed(h: Harness) -> None:
    h.agent.calls[0].deferred.errback(Failure(ConnectionRefusedError()))
    assert slots(h) == {"a.test": 0, "b.test": 1}
    answer(h, 1).end()


def fallback_status_discarded(h: Harness) -> None:
    answer(h, 0, 503)
    assert slots(h) == {"a.test": 0, "b.test": 1}
    h.agent.calls[1].deferred.errback(Failure(ConnectionRefusedError()))


def first_byte_timeout_on_both(h: Harness) -> None:
    h.clock.advance(4)  # before any heartbeat
    h.agent.calls[0].deferred.errback(Failure(ConnectionRefusedError()))
    h.clock.advance(30.1)


def client_left_while_waiting(h: Harness) -> None:
    h.disconnect()


def client_left_while_heartbeating(h: Harness) -> None:
    h.clock.advance(5.1)
    h.disconnect()


def client_left_while_relaying(h: Harness) -> None:
    answer(h, 0).send(b"data: 1\n\n")
    h.disconnect()


def error_status_after_heartbeats(h: Harness) -> None:
    h.clock.advance(5.1)
    answer(h, 0, 503)


def cut_by_the_idle_deadline(h: Harness) -> None:
    answer(h, 0).send(b"data: 1\n\n")
    h.clock.advance(20.1)


def upstream_lost_mid_body(h: Harness) -> None:
    answer(h, 0).end(Failure(ResponseFailed([Failure(ConnectionDone())])))


@pytest.mark.parametrize("drive", [
    relayed_to_the_end, failed_then_fallback_relayed, fallback_status_discarded, first_byte_timeout_on_both,
    client_left_while_waiting, client_left_while_heartbeating, client_left_while_relaying,
    error_status_after_heartbeats, cut_by_the_idle_deadline, upstream_lost_mid_body,
], ids=lambda drive: drive.__name__)
def test_every_slot_is_freed_once_when_its_call_ends(drive: Callable[[Harness], None]) -> None:
    h = make_harness(CONFIG)
    h.send("POST", "/v1/chat/completions", STREAM)
    assert slots(h) == {"a.test": 1, "b.test": 0}
    drive(h)
    assert slots(h) == {"a.test": 0, "b.test": 0}
    h.clock.advance(100)
    assert slots(h) == {"a.test": 0, "b.test": 0}


def test_a_freed_slot_admits_the_next_request() -> None:
    h = make_harness({"routes": [_route("a.test")]})
    h.send("POST", "/v1/chat/completions", STREAM)
    second = h.another_connection()
    second.send("POST", "/v1/chat/completions", STREAM)
    assert b" 429 " in second.output()
    answer(h, 0).end()
    third = h.another_connection()
    third.send("POST", "/v1/chat/completions", STREAM)
    assert len(h.agent.calls) == 2 and third.output() == b""


def test_nothing_leaves_the_ended_phase() -> None:
    assert all(phase is not Phase.ENDED for phase, _ in _TRANSITIONS)
    assert {target for target in _TRANSITIONS.values()} == set(Phase) - {Phase.WAITING}


def _record(detail: Outcome | str, status: int = 200, **observed: object) -> dict:
    return request_record(fields={"route": "r"}, tried=1, status=status, detail=detail, started=10.0,
                          headers_at=10.5, ended=12.0, bytes_relayed=7, observed=observed)


def test_record_of_a_relayed_answer() -> None:
    record = _record(Outcome.OK, first_token_at=11.0, input_tokens=3, oversized_events=1, complete=True)
    assert record == {"route": "r", "candidates_tried": 1, "status": 200, "outcome": "ok", "detail": "ok",
                      "headers_ms": 500.0, "duration_ms": 2000.0, "bytes": 7, "ttft_ms": 1000.0,
                      "input_tokens": 3, "oversized_events": 1}


@pytest.mark.parametrize("detail, status, observed, outcome, recorded", [
    (Outcome.CLIENT_GONE, 200, {"complete": True}, "ok", "ok"),  # the SDK closed after the final event
    (Outcome.CLIENT_GONE, 200, {"complete": False}, "client_gone", "client_gone"),
    (Outcome.OK, 503, {}, "upstream_status", "upstream_status"),  # an upstream error, relayed whole
    (Outcome.CLIENT_STALLED, 200, {}, "client_gone", "client_stalled"),
    (Outcome.UPSTREAM_IDLE, 200, {}, "timeout", "upstream_idle_timeout"),
    ("route_busy", 429, {}, "rejected", "route_busy"),
    ("upstream_unavailable", 503, {}, "upstream_error", "upstream_unavailable"),
])
def test_record_outcome_and_detail(detail: Outcome | str, status: int, observed: dict, outcome: str,
                                   recorded: str) -> None:
    record = _record(detail, status, **observed)
    assert (record["outcome"], record["detail"]) == (outcome, recorded)
    assert "complete" not in record
