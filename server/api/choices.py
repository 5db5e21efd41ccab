"""One choice's answer as the engine finalises it: the text of its final
prefix, what may be streamed yet, its finish reason. Plain Python,
unit-tested without a server."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from server.engine.messages import RequestOutput

Decode = Callable[[list[int]], str]


@dataclass
class Choice:
    index: int
    req_id: str
    prompt_len: int
    blocks: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in the generated part
    token_ids: list[int] = field(default_factory=list)  # the final prefix (ends before any EOS/EoT or stop string)
    text: str = ""  # its text (with stop strings: what the engine reports as settled)
    sent: int = 0  # characters of ``text`` already streamed
    finish_reason: str | None = None
    num_steps: int = 0  # forward passes its request has taken
    num_denoised: int = 0  # denoising steps seen (outputs that committed)
    block: int = 0  # index of the block the last step worked on
    logprobs: list | None = None  # TokenLogprob per token of token_ids when asked, else None
    num_logprobs_sent: int = 0  # tokens whose logprobs a stream has sent
    # Decoding state of the stream's logprobs (server.api.logprobs.PrefixText),
    # so each chunk decodes a bounded window, not the whole answer.
    offset_text: Any = None
    ready_text: Any = None

    def update(self, out: RequestOutput, decode: Decode) -> None:
        """Takes an engine output: its final prefix (and its logprobs when
        asked), and its text (the engine's, when it checked stop strings,
        else decoded here)."""
        self.token_ids = out.token_ids
        if out.logprobs is not None:
            self.logprobs = out.logprobs
        self.text = out.text if out.text is not None else decode(out.token_ids)
        if out.finished:
            self.finish_reason = out.finish_reason

    def ready_delta(self, final: bool) -> str:
        """New text that can be streamed now: not an incomplete UTF-8 character."""
        end = len(self.text)
        if not final and self.text.endswith("\ufffd"):
            end = len(self.text.rstrip("\ufffd"))
        delta = self.text[self.sent:max(end, self.sent)]
        self.sent += len(delta)
        return delta
