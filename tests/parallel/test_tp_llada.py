"""Tensor parallelism on 2 gloo ranks against one process, dense LLaDA:
the golden set's logits (dense and ragged, float64 within 1e-10 and float32)
and generation token for token in every decoding mode and rule, with the KV
cache, sampling noise, guidance, logprobs and likelihood; plus a checkpoint
with fewer KV heads than ranks (replicated) and a vocabulary that does not
split evenly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import golden_path, golden_rows, make_random_checkpoint
from tests.parallel.harness import assert_logits_equal, assert_ranks_agree

PROMPT = [204, 68, 268, 43, 100, 190, 179, 266, 147, 12, 244, 58]
SMALL_PROMPT = [5, 9, 17, 3, 22, 40, 11]

# Every decoding mode and commit rule, sampling, guidance and logprobs, as one ragged batch.
VARIANTS = [
    dict(steps=16, gen_length=24, block_length=8),
    dict(steps=8, gen_length=24, block_length=8, temperature=0.8, seed=7),
    dict(steps=12, gen_length=24, block_length=8, remasking="random", seed=3),
    dict(steps=12, gen_length=24, block_length=8, remasking="margin"),
    dict(steps=12, gen_length=24, block_length=8, remasking="entropy", temperature=0.5, seed=11),
    dict(steps=12, gen_length=24, block_length=8, remasking="threshold", threshold=0.02),
    dict(steps=12, gen_length=24, block_length=8, remasking="factor", factor=2.0),
    dict(steps=12, gen_length=24, block_length=8, temperature=0.9, top_k=5, top_p=0.9, seed=5),
    dict(steps=12, gen_length=24, block_length=8, cfg_scale=0.5),
    dict(steps=12, gen_length=24, block_length=8, decoding="prefix_cache"),
    dict(steps=12, gen_length=24, block_length=8, decoding="dual_cache", temperature=0.7, seed=9),
]
# Logprobs gather their committed rows whole, likelihood scores reduce
# (max, sum, target logit) per row: apart from the batch above, which runs
# on the unmask statistics alone.
LOGPROBS = dict(steps=12, gen_length=24, block_length=8, logprobs=3)


def llada_jobs(tmp: Path) -> list[dict]:
    # 4 q heads, 1 KV head: replicated on both ranks; 61 tokens: 30 and 31 per rank.
    small = make_random_checkpoint(tmp / "ckpt", seed=3, n_kv_heads=1, vocab_size=61, mask_token_id=60,
                                   eos_token_id=59, pad_token_id=59)
    g = golden_path("llada")
    logits = load_file(str(g / "logits.safetensors"))
    ids = logits["logits_input_ids"]
    golden_requests = [(prompt, dict(p, ignore_eos=False)) for _, prompt, p, _ in golden_rows("llada")]
    jobs = []
    for dtype in ("float64", "float32"):
        jobs.append(dict(kind="logits", path=str(g), dtype=dtype, input_ids=ids))
        jobs.append(dict(kind="generate", path=str(g), dtype=dtype, golden=True,
                         requests=golden_requests + [(PROMPT, v) for v in VARIANTS]))
        jobs.append(dict(kind="generate", path=str(g), dtype=dtype, requests=[(PROMPT, LOGPROBS)],
                         likelihood=[(PROMPT[:6], PROMPT[6:], dict(mc_num=4, seed=1))]))
    # Cache use steps padded to batch-size buckets: every rank pads alike.
    jobs.append(dict(kind="generate", path=str(g), dtype="float64", enforce_eager=False,
                     requests=[(PROMPT, v) for v in VARIANTS if v.get("decoding")] * 3))
    jobs.append(dict(kind="logits", path=str(small), dtype="float64",
                     input_ids=torch.tensor([SMALL_PROMPT * 2, SMALL_PROMPT[::-1] * 2])))
    jobs.append(dict(kind="generate", path=str(small), dtype="float64",
                     requests=[(SMALL_PROMPT, dict(v, ignore_eos=True)) for v in VARIANTS]))
    jobs.append(scores_job())
    return jobs


def scores_job() -> dict:
    """Rows whose best token sits on either side of the split, ties across
    the split (lowest id must win, as torch.argmax), a banned token, greedy
    and sampled rows, in float64 and with a vocabulary of 61 (30 + 31)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 61, generator=g, dtype=torch.float64)
    logits[0, 45] = 9.0  # best on rank 1
    logits[1, 3] = 9.0  # best on rank 0
    logits[2, [10, 40]] = 9.0  # tie across the split: 10 wins
    logits[3, [31, 50]] = 9.0  # tie inside rank 1: 31 wins
    logits[4, [29, 30]] = 9.0  # tie at the boundary: 29 wins
    logits[5, 7] = 12.0  # banned: the next best wins (LLaDA's scores; the families' ban nothing)
    return dict(kind="scores", logits=logits, banned_ids=torch.tensor([7]),
                temperature=torch.tensor([0, 0, 0, 0, 0, 0, 0.7, 1.5], dtype=torch.float32),
                seed=torch.arange(8, dtype=torch.int64) + 100, row_offset=torch.arange(8, dtype=torch.int64) * 3)


@pytest.fixture(scope="module")
def results(tp_runs):
    return tp_runs["llada"]


def test_ranks_agree(results):
    assert_ranks_agree(results)


def test_logits_equal_tp1(results):
    assert_logits_equal(results)


def test_generation_equals_tp1(results):
    jobs, tp, single = results
    for job, got, want in zip(jobs, tp[0], single):
        if job["kind"] != "generate":
            continue
        assert got.keys() == want.keys()
        for rid in want:
            if rid.startswith("l"):
                rel = 1e-9 if job["dtype"] == "float64" else 1e-5
                assert got[rid].logprob == pytest.approx(want[rid].logprob, rel=rel)
                continue
            assert got[rid][:2] == want[rid][:2], (job["dtype"], rid)
            if want[rid][2] is not None:
                for (lp, top), (lp1, top1) in zip(got[rid][2], want[rid][2]):
                    assert lp == pytest.approx(lp1, abs=1e-5)
                    assert [t for t, _ in top] == [t for t, _ in top1]


def test_golden_cases_at_tp2(results):
    """The golden generate cases (the reference's own output) at TP=2."""
    jobs, tp, _ = results
    rows = golden_rows("llada")
    for job, got in zip(jobs, tp[0]):
        if job.get("golden"):
            for i, (_, _, _, expected) in enumerate(rows):
                cut = expected[: expected.index(300)] if 300 in expected else expected
                assert got[f"g{i}"][0] == cut


def test_vocab_parallel_scores_equal_whole_rows(results):
    jobs, tp, single = results
    for job, got, got1, want in zip(jobs, tp[0], tp[1], single):
        if job["kind"] != "scores":
            continue
        llada, family = want
        assert llada["x0"][:6].tolist() == [45, 3, 10, 31, 29, llada["x0"][5].item()] and llada["x0"][5] != 7
        assert family["x0"][:5].tolist() == [45, 3, 10, 31, 29]
        for rank in (got, got1):
            for mine, whole in zip(rank, want):  # LLaDA's scores, then the families' (no filter)
                assert torch.equal(mine["x0"], whole["x0"])
                for key in ("prob", "margin", "entropy"):
                    torch.testing.assert_close(mine[key].double(), whole[key].double(), rtol=1e-6, atol=1e-7)
