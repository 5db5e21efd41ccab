"""Stop strings belong to the engine: it ends an answer at the first stop
string of its final text, frees the request at once, returns the text cut
before it and bills the fewest tokens covering that text; while running it
reports only text no stop string can take back."""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from sampler.params import DiffusionParams
from server.engine.llm import LLM
from server.engine.messages import RequestOutput
from server.engine.stop_strings import StopStringState, covering_tokens, find_stop, settled_length
from server.tokenizer import Tokenizer
from tests.conftest import make_text_checkpoint

DEMO = Path(__file__).resolve().parents[2] / "server" / "assets" / "llada-demo"

# A toy tokenizer: token i is the i-th piece; 9 is half of a two-byte character.
PIECES = ["Hel", "lo", ",", " wor", "ld", "!", " STOP", " more", "\u00e9", "\ufffd"]


def decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def step(ids: list[int], new: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", ids[len(ids) - new:], ids, finished, "length" if finished else None)


def test_text_is_held_back_then_cut_at_the_stop_string():
    state = StopStringState(("STOP",))
    a = state.check(step([0, 1], 2), decode)  # "Hello": its last 3 characters could begin "STOP"
    assert a.text == "He" and not a.finished
    b = state.check(step([0, 1, 2, 3], 2), decode)  # "Hello, wor"
    assert b.text == "Hello, " and not b.finished
    c = state.check(step([0, 1, 2, 3, 4, 5, 6, 7], 4), decode)  # "Hello, world! STOP more"
    assert c.finished and c.finish_reason == "stop" and c.text == "Hello, world! "
    assert c.token_ids == [0, 1, 2, 3, 4, 5, 6]  # " STOP" is needed to cover the trailing space
    assert c.new_token_ids == [4, 5, 6]


def test_an_output_without_new_tokens_repeats_the_settled_text():
    state = StopStringState(("zz",))
    state.check(step([0, 1, 2], 3), decode)
    again = state.check(RequestOutput("r", [], [0, 1, 2], False), decode)
    assert again.text == "Hello" and not again.finished  # "Hello," less one character


def test_finishing_without_a_stop_string_reports_all_the_text():
    state = StopStringState(("zzz",))
    done = state.check(step([0, 1, 2], 3, finished=True), decode)
    assert done.text == "Hello," and done.token_ids == [0, 1, 2] and done.finish_reason == "length"


def test_earliest_stop_wins_and_billing_covers_the_text():
    assert find_stop("Hello, world!", ("world", "lo")) == 3
    assert find_stop("Hello", ("x",)) is None
    assert covering_tokens([0, 1, 2, 3, 4, 5, 7], len("Hello, world"), decode) == 5
    assert covering_tokens([0, 1, 2], 0, decode) == 0
    assert settled_length("ab\ufffd", ()) == 2 and settled_length("abcdef", ("xyz",)) == 4


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(make_text_checkpoint(tmp_path_factory.mktemp("stop-ckpt"))), device="cpu", dtype="float32")


def test_the_engine_stops_at_a_stop_string_and_frees_the_request(llm):
    params = DiffusionParams(gen_length=32, steps=32, block_length=8, temperature=0.0, seed=1, ignore_eos=True)
    full = llm.generate([[5, 6, 7]], params)[0]
    assert len(full.text) > 6, full.text
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    cut = full.text.find(stop)
    stopped = llm.generate([[5, 6, 7]], DiffusionParams(**{**vars(params), "stop": (stop,), "logprobs": 0}))[0]
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:cut]
    assert len(stopped.logprobs) == len(stopped.token_ids)  # cut with the tokens
    # The fewest tokens whose text covers the answer, a prefix of the full answer's.
    keep = stopped.token_ids
    assert keep == full.token_ids[:len(keep)]
    assert len(llm.tokenizer.decode(keep)) >= cut and len(llm.tokenizer.decode(keep[:-1])) < cut
    assert stopped.num_steps < full.num_steps  # ended as soon as the stop string was final
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting
    assert not llm.engine._stop_strings


def test_a_stop_string_never_found_changes_nothing(llm):
    params = DiffusionParams(gen_length=16, steps=16, block_length=8, temperature=0.0, seed=2, ignore_eos=True)
    plain = llm.generate([[5, 6]], params)[0]
    with_stop = llm.generate([[5, 6]], DiffusionParams(**{**vars(params), "stop": ("\u2603",)}))[0]
    assert (with_stop.text, with_stop.token_ids, with_stop.finish_reason) == \
        (plain.text, plain.token_ids, plain.finish_reason)


def whole_decode_check(stops: tuple[str, ...], out: RequestOutput, decode, settled: str) -> tuple[RequestOutput, str]:
    """The straightforward twin of StopStringState.check: decode the whole
    final prefix and search all of it, every time."""
    if not out.new_token_ids and not out.finished:
        return replace(out, text=settled), settled
    text = decode(out.token_ids)
    cut = find_stop(text, stops)
    if cut is None:
        settled = text if out.finished else text[:max(settled_length(text, stops), len(settled))]
        return replace(out, text=settled), settled
    keep = covering_tokens(out.token_ids, cut, decode)
    already = len(out.token_ids) - len(out.new_token_ids)
    return replace(out, token_ids=out.token_ids[:keep], new_token_ids=out.new_token_ids[:max(0, keep - already)],
                   text=text[:cut], finished=True, finish_reason="stop"), text[:cut]


def test_windowed_search_equals_the_whole_decode_search():
    """Random answers on the demo tokenizer (multi-byte characters split
    over tokens, special tokens, any token) growing by random steps, random
    stop strings: every output equals the twin's."""
    tok = Tokenizer.load(DEMO)
    rng = random.Random(0)
    words = ["héllo", "wörld", "日本語", "🙂", " STOP", "the end", "\ufffd", " ", "ab"]
    special = sorted(tok.hf.all_special_ids)
    num_stopped = 0
    for trial in range(60):
        ids = []
        while len(ids) < 50:
            r = rng.random()
            if r < 0.5:
                ids += tok.encode(rng.choice(words), add_special_tokens=False)
            else:
                ids.append(rng.choice(special) if r < 0.55 else rng.randrange(tok.vocab_size))
        text = tok.decode(ids)
        stops = tuple({rng.choice([*words, "ö", "本語🙂", "d the"]) for _ in range(rng.randint(1, 3))}
                      | ({text[rng.randrange(len(text)):][:rng.randint(1, 4)]} if rng.random() < 0.3 else set()))
        state, settled, n = StopStringState(stops), "", 0
        while True:
            new = rng.choice([0, 1, 1, 2, 3, 5])
            n = min(n + new, len(ids))
            out = RequestOutput("r", ids[n - new:n] if new else [], ids[:n], n == len(ids), "length" if n == len(ids) else None)
            got = state.check(out, tok.decode)
            want, settled = whole_decode_check(stops, out, tok.decode, settled)
            assert got == want, (trial, n)
            if got.finished:
                num_stopped += got.finish_reason == "stop"
                break
    assert 10 < num_stopped < 60  # both ways of ending were exercised
