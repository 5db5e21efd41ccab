"""PrefixText (the windowed decoding behind logprobs' ``text_offset`` and a
stream's ready tokens) against decoding every prefix, on the demo
tokenizer, for random answers full of multi-byte characters split over
tokens and special tokens."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from server.api.choices import Choice
from server.api.logprobs import PrefixText, ready_tokens
from server.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parents[2] / "server" / "assets" / "llada-demo"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(DEMO)


def answers(tok, num: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    texts = ["héllo wörld", "日本語のテキスト", "emoji 🙂🚀 ok", "plain words here", "\ufffd literal"]
    special = sorted(tok.hf.all_special_ids)
    out = []
    for _ in range(num):
        ids = []
        while len(ids) < 60:
            r = rng.random()
            if r < 0.4:
                ids += tok.encode(rng.choice(texts), add_special_tokens=False)
            elif r < 0.5:
                ids.append(rng.choice(special))
            else:  # any token: single bytes of broken UTF-8 among them
                ids.append(rng.randrange(tok.vocab_size))
        out.append(ids)
    return out


def test_offsets_equal_decoding_every_prefix(tok):
    for ids in answers(tok, 20, seed=0):
        want = [len(tok.decode(ids[:i])) for i in range(len(ids) + 1)]
        assert PrefixText().lengths(tok.decode, ids, 0, len(ids) + 1) == want
        cuts = sorted(random.Random(len(ids)).sample(range(len(ids) + 1), 6))
        state, got = PrefixText(), []  # in stream chunks, one state across them
        for a, b in zip([0, *cuts], [*cuts, len(ids) + 1]):
            got += state.lengths(tok.decode, ids, a, b)
        assert got == want


def old_ready_tokens(c: Choice, decode) -> int:
    sent, n = c.text[:c.sent], c.num_logprobs_sent
    while n < len(c.token_ids):
        text = decode(c.token_ids[:n + 1])
        if len(text) > len(sent) or not sent.startswith(text):
            break
        n += 1
    return n


def test_ready_tokens_equal_decoding_every_prefix(tok):
    rng, moved = random.Random(1), []
    for ids in answers(tok, 15, seed=2):
        c, old = Choice(index=0, req_id="r", prompt_len=0), Choice(index=0, req_id="r", prompt_len=0)
        c.ready_text = PrefixText()  # kept across the stream's chunks, as logprobs_delta keeps it
        for grown in sorted(rng.sample(range(1, len(ids) + 1), 8)):
            for x in (c, old):
                x.token_ids, x.text = ids[:grown], tok.decode(ids[:grown])
                x.ready_delta(final=False)
            want = old_ready_tokens(old, tok.decode)
            got = ready_tokens(c, tok.decode, final=False)
            assert got == want
            c.num_logprobs_sent = old.num_logprobs_sent = want
        moved.append(c.ready_text.num_tokens > 0)
    assert any(moved)  # the window moved on: not decoding from the start
