"""Logprobs of generated tokens: each returned token's logprob (and top
alternatives) is the log-softmax of the model's logits at that position on
the canvas as it was at the step that committed it, recomputed here
independently by replaying the commits through the model's dense forward;
asking for them changes no token and costs the requests that do not ask
nothing (they get none)."""
from __future__ import annotations

import math

import pytest
import torch

from sampler.params import DiffusionParams
from server.config import ModelConfig
from server.engine.engine import LLMEngine
from tests.conftest import REPO

DEMO = REPO / "server" / "assets" / "llada-demo"


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(ModelConfig(str(DEMO), dtype="float32", device="cpu"))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], DiffusionParams]]):
    """Runs the requests in one batch; returns req_id -> (final output, the
    commits of every step in order)."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    steps: dict[str, list[tuple[list[int], list[int]]]] = {rid: [] for rid in requests}
    final = {}
    while len(final) < len(requests):
        for out in engine.step():
            if out.committed is not None:
                steps[out.req_id].append(out.committed)
            if out.finished:
                assert out.finish_reason in ("stop", "length"), out.error
                final[out.req_id] = out
    return {rid: (final[rid], steps[rid]) for rid in requests}


def replayed_logprobs(engine: LLMEngine, prompt: list[int], canvas_length: int, steps, cfg_scale: float = 0.0,
                      block_length: int | None = None):
    """Generated-part offset -> log-softmax row (vocab,) of the step that
    (last) wrote it: the canvas rebuilt commit by commit (edits included),
    the model run densely on the whole canvas (and its prompt-masked twin
    under guidance)."""
    mask = engine.mask_id
    canvas = list(prompt) + [mask] * canvas_length
    rows = {}
    for positions, tokens in steps:
        with torch.inference_mode():
            logits = engine.model.forward_dense(torch.tensor([canvas]), block_length=block_length)[0].double()
            if cfg_scale > 0:
                uncond = engine.model.forward_dense(torch.tensor([[mask] * len(prompt) + canvas[len(prompt):]]))[0]
                logits = uncond.double() + (cfg_scale + 1) * (logits - uncond.double())
        lp = torch.log_softmax(logits, dim=-1)
        for p, t in zip(positions, tokens):
            rows[p - len(prompt)] = lp[p]
            canvas[p] = t
    return rows


def check(engine, prompt, params, out, steps, k, canvas_length=None, block_length=None):
    rows = replayed_logprobs(engine, prompt, canvas_length or params.gen_length, steps, params.cfg_scale,
                             block_length)
    assert out.token_ids, "the case must return tokens"
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        ref = rows[i]
        assert lp.logprob == pytest.approx(float(ref[tok]), abs=1e-4)
        assert len(lp.top) == k
        ref_top = torch.topk(ref, k)
        assert [v for _, v in lp.top] == pytest.approx(ref_top.values.tolist(), abs=1e-4)
        for (tid, v) in lp.top:  # ids may swap only between (near-)ties
            assert float(ref[tid]) == pytest.approx(v, abs=1e-4)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))
        if k and lp.logprob > lp.top[-1][1] + 1e-6:
            assert tok in [t for t, _ in lp.top]


def test_logprobs_equal_the_replayed_model(engine):
    tok = engine.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "reverse: apple banana cherry"}])
    cases = {
        "greedy": (prompt, DiffusionParams(gen_length=16, steps=16, block_length=8, logprobs=5)),
        "sampled": (tok.encode("red blue green"),
                    DiffusionParams(gen_length=12, steps=6, block_length=4, temperature=0.9, top_k=20, seed=3,
                                    ignore_eos=True, logprobs=3)),
        "guided": (prompt, DiffusionParams(gen_length=8, steps=8, block_length=8, cfg_scale=1.0, logprobs=0)),
        "silent": (prompt, DiffusionParams(gen_length=16, steps=16, block_length=8)),
    }
    results = run(engine, cases)
    for name, k in (("greedy", 5), ("sampled", 3), ("guided", 0)):
        out, steps = results[name]
        check(engine, cases[name][0], cases[name][1], out, steps, k)
    silent, _ = results["silent"]
    assert silent.logprobs is None
    # asking changes no token
    assert silent.token_ids == results["greedy"][0].token_ids
    # greedy picks the argmax: its logprob is the top one
    for lp in results["greedy"][0].logprobs:
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob <= 0 and math.isfinite(lp.logprob)


@pytest.mark.golden
def test_logprobs_of_edited_tokens_are_those_of_their_last_write():
    """LLaDA2.1 token editing re-writes decoded tokens: a token's logprob is
    the one of the step that wrote what is returned."""
    from tests.conftest import golden_path

    engine = LLMEngine(ModelConfig(str(golden_path("llada2")), dtype="float64", device="cpu"))
    prompt = [456, 194, 50, 438, 161, 225, 22, 126, 79, 452, 277, 259]
    params = DiffusionParams(**(engine.decoding_defaults | dict(
        gen_length=20, block_length=8, steps=8, threshold=0.9, editing_threshold=0.2, logprobs=2)))
    out, steps = run(engine, {"edit": (prompt, params)})["edit"]
    written = [p for positions, _ in steps for p in positions]
    assert len(written) > len(set(written)), "the case must edit tokens"
    padded = -(-(len(prompt) + 20) // 8) * 8 - len(prompt)  # the grid from position 0, whole blocks
    check(engine, prompt, params, out, steps, 2, canvas_length=padded, block_length=8)


def test_logprobs_bound():
    with pytest.raises(ValueError, match="logprobs"):
        DiffusionParams(logprobs=21)
    with pytest.raises(ValueError, match="logprobs"):
        DiffusionParams(logprobs=-1)
