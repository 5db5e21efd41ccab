"""The text of a growing token list, decoded a bounded window at a time.

Decoding every prefix of an answer (logprobs' text offsets, a stream's
ready tokens, stop strings) is quadratic over the answer; this keeps an
anchor where the text ends in a whole character and decodes only past it,
with the same results.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

Decode = Callable[[list[int]], str]

# Tokens decoded ahead of a window: a decoder may treat the first token it
# sees differently (e.g. strip its leading space), so text past the anchor is
# the difference of two decodes that start at the same context.
_NUM_CONTEXT_TOKENS = 4


@dataclass
class PrefixText:
    """The text of a growing token list's prefixes, decoded a bounded window
    at a time instead of from the start (which is quadratic over an answer).
    The anchor is a prefix whose text ends in a whole character, so text past
    it cannot change what came before; ``tail`` decodes only from a few
    tokens before it. The list may grow between calls (a choice's final
    prefix only grows) or be cut, not changed before the anchor.
    ``tests/api/test_prefix_text.py`` and
    ``tests/engine/test_stop_strings.py`` check it against decoding every
    prefix."""
    num_tokens: int = 0  # tokens in the anchor prefix
    num_chars: int = 0  # len(decode(ids[:num_tokens]))
    context_ids: list[int] = field(default_factory=list)  # the last few of those tokens
    context_text: str = ""  # decode(context_ids)

    def tail(self, decode: Decode, ids: list[int], i: int) -> str:
        """The text of ids[:i] past the anchor's (i >= the anchor)."""
        a = self.num_tokens
        if a > i or ids[a - len(self.context_ids):a] != self.context_ids:  # not this list's prefix: start over
            self.__init__()
            a = 0
        text = decode(self.context_ids + ids[a:i])
        if text.startswith(self.context_text):
            return text[len(self.context_text):]
        return decode(ids[:i])[self.num_chars:]  # a decoder the window does not fit

    def advance(self, decode: Decode, ids: list[int], i: int, tail: str) -> None:
        """Moves the anchor to ids[:i] (``tail`` its text past the anchor)
        when that text ends in a whole character."""
        if i <= self.num_tokens or tail.endswith("\ufffd") or not tail:
            return
        self.num_tokens, self.num_chars = i, self.num_chars + len(tail)
        self.context_ids = ids[max(0, i - _NUM_CONTEXT_TOKENS):i]
        self.context_text = decode(self.context_ids)

    def lengths(self, decode: Decode, ids: list[int], start: int, end: int) -> list[int]:
        """len(decode(ids[:i])) for i in [start, end)."""
        out = []
        for i in range(start, end):
            tail = self.tail(decode, ids, i)
            out.append(self.num_chars + len(tail))
            self.advance(decode, ids, i, tail)
        return out
