"""Choice: incremental text, stop strings and billing, without a server."""
from __future__ import annotations

from server.api.choices import Choice

# A toy tokenizer: token i is the i-th piece; 9 is half of a two-byte character.
PIECES = ["Hel", "lo", ",", " wor", "ld", "!", " STOP", " more", "\u00e9", "\ufffd"]


def decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def test_deltas_hold_back_what_may_change():
    c = Choice(0, "r", 3, stops=["STOP"])
    c.update([0, 1], decode)  # "Hello": the last 3 characters could begin "STOP"
    assert c.ready_delta(final=False) == "He"
    c.update([0, 1, 2, 3], decode)  # "Hello, wor"
    assert c.ready_delta(final=False) == "llo, "
    c.update([0, 1, 2, 3, 4, 5, 6, 7], decode)  # "Hello, world! STOP more"
    assert c.finish_reason == "stop" and c.stopped_by_string and c.text == "Hello, world! "
    assert c.ready_delta(final=True) == "world! "  # nothing of the stop string leaks
    assert c.ready_delta(final=True) == ""


def test_incomplete_character_is_held_back():
    c = Choice(0, "r", 3, stops=[])
    c.update([0, 9], decode)
    assert c.ready_delta(final=False) == "Hel"
    c.update([0, 8], decode)
    assert c.ready_delta(final=True) == "\u00e9"


def test_billing():
    c = Choice(0, "r", 3, stops=["!"])
    c.update([0, 1, 2, 3, 4, 5, 7], decode)
    assert c.text == "Hello, world" and c.completion_tokens(decode) == 5
    plain = Choice(0, "r", 3, stops=["zzz"])
    plain.update([0, 1, 2], decode)
    assert plain.completion_tokens(decode) == 3  # no stop string matched: every final token
