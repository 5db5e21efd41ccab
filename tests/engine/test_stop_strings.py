"""Stop strings belong to the engine: it ends an answer at the first stop
string of its final text, frees the request at once, returns the text cut
before it and bills the fewest tokens covering that text; while running it
reports only text no stop string can take back."""
from __future__ import annotations

import pytest

from sampler.params import DiffusionParams
from server.engine.llm import LLM
from server.engine.messages import RequestOutput
from server.engine.stop_strings import StopStringState, covering_tokens, find_stop, settled_length
from tests.conftest import make_text_checkpoint

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
