"""The likelihood estimate: the engine against the transcription of LLaDA's
get_log_likelihood / suffix_greedy_prediction (sampler/reference.py), and
against the exact expectation, enumerated mask pattern by mask pattern,
which trusts neither copy."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from sampler.likelihood import draw_masks, stratified_counts
from sampler.params import DiffusionParams, LikelihoodParams
from sampler.reference import generate, get_log_likelihood, suffix_greedy_prediction
from server.engine.llm import LLM

MASK_ID = 310  # the golden checkpoint's


@pytest.fixture(scope="module")
def llm64(golden_dir):
    return LLM(str(golden_dir), dtype="float64", device="cpu", max_num_batched_tokens=512)


def scheme_counts(num_targets: int, batch_size: int, k: int) -> list[int]:
    """The reference's counts, as its line computes them: a float32
    linspace from k to k + (b - 1) T / b, rounded half to even, wrapped into 1..T."""
    k_t = torch.tensor(k)
    x = torch.round(torch.linspace(float(k_t), k_t + (batch_size - 1) * (num_targets / batch_size),
                                   steps=batch_size)).long()
    return (((x - 1) % num_targets) + 1).tolist()


def test_counts_are_the_stratified_scheme():
    for t, b in itertools.product(range(1, 9), range(1, 17)):
        for k in range(1, t + 1):
            counts = list(stratified_counts(t, b, k))
            assert counts == scheme_counts(t, b, k), (t, b, k)
            # In exact arithmetic too, except where k + i T / b is a half
            # (float32 may land on either side of it).
            for i, x in enumerate(counts):
                exact = Fraction(k) + Fraction(i * t, b)
                if exact.denominator != 2:
                    assert x == ((round(exact) - 1) % t) + 1, (t, b, k, i)


def test_masks_have_the_counts_and_do_not_depend_on_chunking():
    is_mask, counts = draw_masks(7, 9, 8, list(range(32)))
    assert is_mask.sum(1).tolist() == counts.tolist() and counts.min() >= 1 and counts.max() <= 9
    parts = [draw_masks(7, 9, 8, ids)[0] for ids in (list(range(5)), list(range(5, 19)), list(range(19, 32)))]
    assert torch.equal(torch.cat(parts), is_mask)
    assert not torch.equal(draw_masks(8, 9, 8, list(range(32)))[0], is_mask)  # the seed matters


PAIRS = [([5, 6, 7, 8, 9], [11, 12, 13]), ([1, 2, 3], [4, 5, 6, 7, 8, 9, 10]), ([], [40, 41]),
         ([20] * 12, [21])]


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_engine_matches_transcription(llm64, cfg):
    model = llm64.engine.model.forward_dense
    params = LikelihoodParams(mc_num=24, batch_size=8, seed=11, cfg_scale=cfg, check_greedy=False)
    got = llm64.loglikelihood(PAIRS, params)
    for (ctx, cont), r in zip(PAIRS, got):
        want = get_log_likelihood(model, torch.tensor(ctx, dtype=torch.long), torch.tensor(cont), mc_num=24,
                                  batch_size=8, cfg_scale=cfg, mask_id=MASK_ID, seed=11)
        assert r.logprob == pytest.approx(want, rel=1e-10, abs=1e-10)
        assert r.num_tokens == len(cont) and r.is_greedy is None
        assert (r.stderr > 0) if len(cont) > 1 else (r.stderr == 0)  # one token: always masked, exact


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_greedy_check_matches_transcription(llm64, cfg):
    model = llm64.engine.model.forward_dense
    pairs = []
    for ctx, n in (([5, 6, 7, 8, 9], 4), ([30, 31], 3), ([100, 101, 102], 1)):
        greedy = generate(model, torch.tensor([ctx]), None, steps=n, gen_length=n, block_length=n, cfg_scale=cfg,
                          mask_id=MASK_ID)[0, len(ctx):].tolist()
        wrong_last = greedy[:-1] + [(greedy[-1] + 1) % 300]
        wrong_first = [(greedy[0] + 1) % 300] + greedy[1:]
        pairs += [(ctx, greedy), (ctx, wrong_last), (ctx, wrong_first)]
    got = llm64.loglikelihood(pairs, LikelihoodParams(mc_num=2, cfg_scale=cfg))
    want = [suffix_greedy_prediction(model, torch.tensor(c), torch.tensor(y), cfg, MASK_ID) for c, y in pairs]
    assert [r.is_greedy for r in got] == want
    assert want[::3] == [True] * 3 and not any(want[1::3]) and not any(want[2::3])


def exact_expectation(model, ctx: list[int], cont: list[int], batch_size: int) -> float:
    """E[-L] under the scheme, by enumeration: for every row i of a batch
    and every k (uniform in 1..T), the count x = x_i(k), and every set of x
    masked positions (each with probability 1 / C(T, x))."""
    t = len(cont)
    seq = torch.tensor(ctx + cont)
    subsets = [s for n in range(1, t + 1) for s in itertools.combinations(range(t), n)]
    canvases = seq.repeat(len(subsets), 1)
    for j, s in enumerate(subsets):
        canvases[j, [len(ctx) + p for p in s]] = MASK_ID
    with torch.no_grad():
        logp = torch.log_softmax(model(canvases, None).double(), dim=-1)
    loss_of = {}
    for j, s in enumerate(subsets):
        ce = -sum(float(logp[j, len(ctx) + p, cont[p]]) for p in s)
        loss_of[s] = ce / (len(s) / t)
    by_count = {n: sum(loss_of[s] for s in subsets if len(s) == n) / math.comb(t, n) for n in range(1, t + 1)}
    total = sum(by_count[x] for k in range(1, t + 1) for x in scheme_counts(t, batch_size, k))
    return -total / (t * batch_size)


@pytest.mark.parametrize("ctx,cont,batch_size", [([5, 6, 7, 8], [11, 12, 13, 14, 15, 16], 16),
                                                 ([1, 2, 3], [50, 60, 70, 80], 5),
                                                 ([9, 8], [7, 6, 5], 3)])
def test_monte_carlo_estimate_is_within_4_standard_errors_of_the_exact_expectation(llm64, ctx, cont, batch_size):
    exact = exact_expectation(llm64.engine.model.forward_dense, ctx, cont, batch_size)
    r = llm64.loglikelihood([(ctx, cont)], LikelihoodParams(mc_num=batch_size * 60, batch_size=batch_size,
                                                            seed=5, check_greedy=False))[0]
    assert 0 < r.stderr < 0.1 * abs(exact)
    assert abs(r.logprob - exact) < 4 * r.stderr, (r.logprob, exact, r.stderr)


def test_fixed_seed_gives_the_same_estimate_alone_and_batched(golden_dir, llm64):
    pair = ([5, 6, 7, 8, 9], [11, 12, 13, 14])
    params = LikelihoodParams(mc_num=32, batch_size=8, seed=99)
    alone = llm64.loglikelihood([pair], params)[0]
    # Another engine with a budget that chunks the samples differently; the
    # pair batched with other pairs and with a generation request.
    other = LLM(str(golden_dir), dtype="float64", device="cpu", max_num_batched_tokens=100)
    engine = other.engine
    engine.add_request("gen", [3, 4, 5], DiffusionParams(gen_length=8, steps=8, block_length=4))
    batched = other.loglikelihood([PAIRS[0], pair, PAIRS[1]], params)[1]
    assert batched.logprob == pytest.approx(alone.logprob, rel=1e-12)
    assert batched.stderr == pytest.approx(alone.stderr, rel=1e-9) and batched.is_greedy == alone.is_greedy
    assert other.loglikelihood([pair], LikelihoodParams(mc_num=32, batch_size=8, seed=100))[0].logprob \
        != pytest.approx(alone.logprob, rel=1e-6)
