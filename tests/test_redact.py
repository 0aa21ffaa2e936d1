"""The redactor that masks route keys in upstream error bodies."""
from __future__ import annotations

from navtwist.upstream.redact import HOLD_BYTES, Redactor

KEY = b"sk-secret-0123456789"


def _run(redactor: Redactor, chunks: list[bytes]) -> bytes:
    return b"".join(redactor.feed(chunk) for chunk in chunks) + redactor.flush()


def test_a_key_is_masked_with_the_same_length() -> None:
    body = b'{"error":"bad key ' + KEY + b'"}'
    out = _run(Redactor([KEY]), [body])
    assert out == body.replace(KEY, b"*" * len(KEY)) and len(out) == len(body)


def test_a_key_split_at_every_position_is_masked() -> None:
    body = b"x" * 5 + KEY + b"y" * 5
    for cut in range(len(body) + 1):
        assert KEY not in _run(Redactor([KEY]), [body[:cut], body[cut:]])


def test_small_bodies_go_out_whole_at_the_end() -> None:
    redactor = Redactor([KEY])
    assert redactor.feed(b"part one, ") == b"" and redactor.feed(b"part two") == b""
    assert redactor.flush() == b"part one, part two"


def test_past_the_hold_a_body_streams_with_a_bounded_tail_and_keys_split_there_are_caught() -> None:
    redactor = Redactor([KEY])
    first = redactor.feed(b"a" * HOLD_BYTES + KEY[:5])
    assert len(first) == HOLD_BYTES + 5 - (len(KEY) - 1)  # everything but a possible key start
    out = first + redactor.feed(KEY[5:] + b"b" * 100) + redactor.flush()
    assert KEY not in out and out.endswith(b"*" * len(KEY) + b"b" * 100)


def test_short_and_empty_secrets_are_not_masked() -> None:
    redactor = Redactor([b"", b"EMPTY"])
    assert not redactor
    assert _run(redactor, [b"EMPTY is a word"]) == b"EMPTY is a word"
