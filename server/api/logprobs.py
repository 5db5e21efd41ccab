"""Logprobs of returned tokens in OpenAI's two formats.

The numbers come from the engine (``TokenLogprob``): each token's
log-probability under the model's distribution at the position and
denoising step that committed it, and the likeliest tokens there. Here they
are only laid out: the legacy completions object (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``) or the chat one
(``content: [{token, logprob, bytes, top_logprobs}]``), for a range of a
choice's tokens, so a stream sends each token's logprobs with its text.
"""
from __future__ import annotations

from server.api.choices import Choice, Decode
from server.prefix_text import PrefixText

# JSON has no -Infinity; a token the model rules out gets this floor instead
# (vLLM's choice).
LOGPROB_FLOOR = -9999.0


def _finite(x: float) -> float:
    return x if x > LOGPROB_FLOOR else LOGPROB_FLOOR


def completion_logprobs(tok, decode: Decode, c: Choice, start: int, end: int,
                        offsets: PrefixText | None = None) -> dict:
    """The legacy object for tokens [start, end) of a choice; ``text_offset``
    is each token's start in the choice's text (``offsets`` carries the
    decoding done for earlier ranges)."""
    ids, lps = c.token_ids[start:end], c.logprobs[start:end]
    pieces = tok.token_pieces(ids)
    alt_ids = [t for lp in lps for t, _ in lp.top]
    alt_pieces = iter(tok.token_pieces(alt_ids))
    top = [{next(alt_pieces): _finite(v) for _, v in lp.top} for lp in lps]
    return {"tokens": pieces, "token_logprobs": [_finite(lp.logprob) for lp in lps], "top_logprobs": top,
            "text_offset": (offsets or PrefixText()).lengths(decode, c.token_ids, start, end)}


def chat_logprobs(tok, c: Choice, start: int, end: int) -> dict:
    """The chat object for tokens [start, end) of a choice."""
    ids, lps = c.token_ids[start:end], c.logprobs[start:end]

    def entries(token_ids: list[int], values: list[float]) -> list[dict]:
        return [{"token": p, "logprob": _finite(v), "bytes": list(b)}
                for p, v, b in zip(tok.token_pieces(token_ids), values, tok.token_bytes(token_ids))]

    content = entries(ids, [lp.logprob for lp in lps])
    alts = entries([t for lp in lps for t, _ in lp.top], [v for lp in lps for _, v in lp.top])
    i = 0
    for entry, lp in zip(content, lps):
        entry["top_logprobs"] = alts[i:i + len(lp.top)]
        i += len(lp.top)
    return {"content": content, "refusal": None}


def ready_tokens(c: Choice, decode: Decode, final: bool) -> int:
    """How many of a choice's tokens have their text streamed already (their
    logprobs go out with it); when final, all the tokens returned."""
    if final:
        return len(c.token_ids)
    sent = c.text[:c.sent]
    n = c.num_logprobs_sent
    # The anchor only passes tokens found ready, so its text is streamed
    # text: sent[:anchor.num_chars].
    anchor = c.ready_text if c.ready_text is not None else PrefixText()
    while n < len(c.token_ids):
        tail = anchor.tail(decode, c.token_ids, n + 1)
        if anchor.num_chars + len(tail) > len(sent) or not sent.startswith(tail, anchor.num_chars):
            break
        n += 1
        anchor.advance(decode, c.token_ids, n, tail)
    return n


def logprobs_delta(kind: str, tok, decode: Decode, c: Choice, final: bool) -> dict | None:
    """The logprobs of the tokens a stream has not sent yet whose text it has
    (None when the choice did not ask)."""
    if c.logprobs is None:
        return None
    if c.ready_text is None:
        c.ready_text, c.offset_text = PrefixText(), PrefixText()
    start, end = c.num_logprobs_sent, ready_tokens(c, decode, final)
    c.num_logprobs_sent = max(start, end)
    if kind == "chat":
        return chat_logprobs(tok, c, start, end)
    return completion_logprobs(tok, decode, c, start, end, c.offset_text)


def final_logprobs(kind: str, tok, decode: Decode, c: Choice) -> dict | None:
    if c.logprobs is None:
        return None
    end = len(c.token_ids)
    return chat_logprobs(tok, c, 0, end) if kind == "chat" else completion_logprobs(tok, decode, c, 0, end)
