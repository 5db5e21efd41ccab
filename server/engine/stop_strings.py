"""Stop strings, a decoding matter: the engine ends an answer at the first
stop string in the text of its final prefix (exact early stop: committed
final tokens never change, so nothing after it can matter), frees the
request's slot at once, and returns the text cut before it and the fewest
tokens whose text covers what is returned.

While the answer runs, the text it reports is *settled*: without a trailing
incomplete UTF-8 character, nor the tail that could still grow into a stop
string. Plain Python; the decode function is the tokenizer's. Each check
decodes only past the text earlier checks settled (server/prefix_text.py)
and searches only where a new stop string can be.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from server.engine.messages import RequestOutput
from server.prefix_text import PrefixText

Decode = Callable[[list[int]], str]


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Where the earliest stop string in ``text`` beginning at ``start`` or
    later begins, or None."""
    cuts = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def settled_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of a running answer's text cannot change any more: not an
    incomplete character (decoded as U+FFFD), nor a tail that may be the
    start of a stop string."""
    end = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
    if stops:
        end = min(end, len(text) - max(map(len, stops)) + 1)
    return max(end, 0)


def covering_tokens(token_ids: list[int], num_chars: int, decode: Decode) -> int:
    """The fewest leading tokens whose text is at least ``num_chars`` long
    (binary search: a longer prefix never decodes shorter)."""
    lo, hi = 0, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(token_ids[:mid])) >= num_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class StopStringState:
    """One request's stop strings and the settled text it last reported."""

    stops: tuple[str, ...]
    text: str = ""
    prefix: PrefixText = field(default_factory=PrefixText)  # decoding state of the final prefix
    decoded: str = ""  # the final prefix's text at the last check

    def _decode(self, token_ids: list[int], decode: Decode) -> tuple[str, int]:
        """The text of ``token_ids``, and where a stop string not seen by
        earlier checks can begin in it: none lies wholly in the text before
        the anchor (it was there, unchanged, when they searched)."""
        tail = self.prefix.tail(decode, token_ids, len(token_ids))
        num_stable = self.prefix.num_chars  # after tail(), which starts over on a list it does not know
        text = self.decoded[:num_stable] + tail
        self.prefix.advance(decode, token_ids, len(token_ids), tail)
        self.decoded = text
        return text, max(0, num_stable - max(map(len, self.stops), default=1) + 1)

    def check(self, out: RequestOutput, decode: Decode) -> RequestOutput:
        """``out`` with its text: cut and finished at a stop string, or the
        settled text so far (all of it once finished)."""
        if not out.new_token_ids and not out.finished:  # the final prefix has not grown
            return replace(out, text=self.text)
        text, start = self._decode(out.token_ids, decode)
        cut = find_stop(text, self.stops, start)
        if cut is None:
            self.text = text if out.finished else text[:max(settled_length(text, self.stops), len(self.text))]
            return replace(out, text=self.text)
        self.text = text[:cut]
        keep = covering_tokens(out.token_ids, cut, decode)
        already = len(out.token_ids) - len(out.new_token_ids)  # tokens reported by earlier outputs
        return replace(out, token_ids=out.token_ids[:keep], new_token_ids=out.new_token_ids[:max(0, keep - already)],
                       logprobs=None if out.logprobs is None else out.logprobs[:keep],
                       text=self.text, finished=True, finish_reason="stop")
