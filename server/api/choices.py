"""One choice's answer as the engine finalises it: text decoded from the
final prefix, stop strings, what may be streamed yet, tokens to bill.
Plain Python, unit-tested without a server."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

Decode = Callable[[list[int]], str]


@dataclass
class Choice:
    index: int
    req_id: str
    prompt_len: int
    stops: list[str]
    blocks: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in the generated part
    token_ids: list[int] = field(default_factory=list)  # the final prefix (ends before any EOS/EoT)
    text: str = ""  # its text, cut before the first stop string once one appears
    sent: int = 0  # characters of ``text`` already streamed
    finish_reason: str | None = None
    stopped_by_string: bool = False
    num_steps: int = 0  # forward passes its request has taken
    num_denoised: int = 0  # denoising steps seen (outputs that committed)
    block: int = 0  # index of the block the last step worked on
    logprobs: list | None = None  # TokenLogprob per token of token_ids when asked, else None
    num_logprobs_sent: int = 0  # tokens whose logprobs a stream has sent

    def update(self, token_ids: list[int], decode: Decode, logprobs: list | None = None) -> None:
        if logprobs is not None:
            self.logprobs = logprobs
        self._update_text(token_ids, decode)

    def _update_text(self, token_ids: list[int], decode: Decode) -> None:
        self.token_ids = token_ids
        text = decode(token_ids)
        for s in self.stops:
            cut = text.find(s)
            if cut >= 0:
                text, self.finish_reason, self.stopped_by_string = text[:cut], "stop", True
        self.text = text

    def ready_delta(self, final: bool) -> str:
        """New text that can be streamed now: not an incomplete UTF-8
        character, nor what could still turn into a stop string."""
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end = len(self.text.rstrip("\ufffd"))
            if self.stops:
                end = min(end, len(self.text) - max(len(s) for s in self.stops) + 1)
        delta = self.text[self.sent:max(end, self.sent)]
        self.sent += len(delta)
        return delta

    def completion_tokens(self, decode: Decode) -> int:
        """Tokens returned: all of the final prefix, or after a stop string
        the fewest whose text covers what was returned (binary search)."""
        if not self.stopped_by_string:
            return len(self.token_ids)
        lo, hi = 0, len(self.token_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(decode(self.token_ids[:mid])) >= len(self.text):
                hi = mid
            else:
                lo = mid + 1
        return lo
