"""Choice: the text of engine outputs and what may be streamed yet, without a server."""
from __future__ import annotations

from server.api.choices import Choice
from server.engine.messages import RequestOutput

# A toy tokenizer: token i is the i-th piece; 9 is half of a two-byte character.
PIECES = ["Hel", "lo", ",", " wor", "ld", "!", " STOP", " more", "\u00e9", "\ufffd"]


def decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def out(ids: list[int], finished: bool = False, text: str | None = None) -> RequestOutput:
    return RequestOutput("r", ids, ids, finished, "length" if finished else None, text=text)


def test_incomplete_character_is_held_back():
    c = Choice(0, "r", 3)
    c.update(out([0, 9]), decode)
    assert c.ready_delta(final=False) == "Hel"
    c.update(out([0, 8], finished=True), decode)
    assert c.ready_delta(final=True) == "\u00e9" and c.finish_reason == "length"


def test_the_engines_text_is_taken_as_it_is():
    """With stop strings the engine reports the settled text: the choice
    streams exactly it, never decoding past it."""
    c = Choice(0, "r", 3)
    c.update(out([0, 1, 2, 3], text="Hello, "), decode)
    assert c.ready_delta(final=False) == "Hello, "
    c.update(RequestOutput("r", [4, 5], [0, 1, 2, 3, 4, 5], True, "stop", text="Hello, world"), decode)
    assert c.ready_delta(final=True) == "world" and c.finish_reason == "stop"
