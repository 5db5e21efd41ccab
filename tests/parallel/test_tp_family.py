"""Tensor parallelism on 2 gloo ranks against one process for LLaDA-MoE
(experts split across ranks), LLaDA2 (fused query_key_value split per head,
partial rotary, block-causal, shared expert) and Dream (q/k/v biases,
shifted logits): every logits entry of each golden set (float64 within
1e-10 of TP=1, float32) and every golden generate case token for token,
alone in one ragged batch with the families' other settings (LLaDA2's
prefix cache and LLaDA2.1 editing, Dream's rules and sampling)."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.conftest import golden_cases, golden_path, golden_rows
from tests.parallel.harness import assert_logits_equal, assert_ranks_agree

pytestmark = pytest.mark.golden


def cut(ids: list[int], stop: set[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in stop), ids)


def logits_jobs(name: str, dtype: str) -> list[dict]:
    g = golden_path(name)
    data = load_file(str(g / "logits.safetensors"))
    block = data.get("logits_block_length")
    config = {} if block is None else {"block_length": int(block[0])}
    jobs = [dict(kind="logits", path=str(g), dtype=dtype, input_ids=data["logits_input_ids"], config=config)]
    if "padded_attention_mask" in data:
        jobs.append(dict(kind="logits", path=str(g), dtype=dtype, config=config,
                         input_ids=data.get("padded_input_ids", data["logits_input_ids"]),
                         attention_mask=data["padded_attention_mask"]))
    return jobs


def llada_moe_requests() -> tuple[list, list]:
    rows = golden_rows("llada-moe")
    requests = [(prompt, dict(gen_length=p["gen_length"], steps=p["steps"], block_length=p["block_length"],
                              remasking=p["remasking"])) for _, prompt, p, _ in rows]
    requests.append((rows[0][1], dict(gen_length=16, steps=8, block_length=8, temperature=0.9, seed=4,
                                      decoding="dual_cache")))
    return requests, [cut(gen, {300}) for _, _, _, gen in rows]


def llada2_requests() -> tuple[list, list]:
    requests, expected = [], []
    for case in golden_cases("llada2"):
        p = case["params"]
        editing = p.get("editing_threshold") if case["generate"] == "llada21" else None
        for decoding in ("exact", "prefix_cache"):
            requests.append((case["prompt"][0], dict(
                gen_length=p["gen_length"], block_length=p["block_length"], steps=p["steps"],
                threshold=p["threshold"], editing_threshold=editing, max_post_steps=p.get("max_post_steps", 16),
                num_to_transfer=p.get("num_to_transfer", 1), decoding=decoding)))
            expected.append(cut(case["expected"][0], {case["eos_id"]}))
    # Editing that happens (low threshold) and sampling, beside them.
    requests.append(([170, 392, 200, 306, 192], dict(gen_length=20, block_length=8, steps=8, threshold=0.9,
                                                     editing_threshold=0.25, max_post_steps=1)))
    requests.append(([11, 22, 33, 44, 55], dict(gen_length=16, block_length=4, steps=4, temperature=1.5, top_p=0.8,
                                                 seed=2, threshold=0.5)))
    return requests, expected


def dream_requests() -> tuple[list, list]:
    requests, expected = [], []
    for case in golden_cases("dream"):
        p = case["params"]
        for r, row in enumerate(case["prompt"]):
            start = 0 if case["attention_mask"] is None else case["attention_mask"][r].index(1)
            requests.append((row[start:], dict(
                gen_length=p["max_new_tokens"], steps=p["steps"], eps=p["eps"], remasking=p["alg"],
                alg_temp=p["alg_temp"] or 0.0, temperature=p["temperature"], top_p=p["top_p"] or 1.0,
                top_k=p["top_k"] or 0, ignore_eos=True, seed=r + 1)))
            # origin's golden coins are torch.rand's: only TP=1 equality is asked of it
            expected.append(None if p["alg"] == "origin" else case["expected"][r][len(row):])
    requests.append(([151, 235, 90, 35, 44, 242], dict(gen_length=12, steps=6, remasking="entropy", alg_temp=0.5,
                                                        seed=4, ignore_eos=True)))
    return requests, expected


REQUESTS = {"llada-moe": llada_moe_requests, "llada2": llada2_requests, "dream": dream_requests}


def family_jobs() -> list[dict]:
    jobs = []
    for name, make in REQUESTS.items():
        for dtype in ("float64", "float32"):
            jobs += logits_jobs(name, dtype)
            requests, expected = make()
            jobs.append(dict(kind="generate", path=str(golden_path(name)), dtype=dtype, requests=requests,
                             expected=expected, name=name))
    return jobs


@pytest.fixture(scope="module")
def results(tp_runs):
    return tp_runs["family"]


def test_ranks_agree(results):
    assert_ranks_agree(results)


def test_logits_equal_tp1(results):
    assert_logits_equal(results)


def test_generation_equals_tp1_and_golden(results):
    jobs, tp, single = results
    for job, got, want in zip(jobs, tp[0], single):
        if job["kind"] != "generate":
            continue
        assert got == want, (job["name"], job["dtype"])
        for i, expected in enumerate(job["expected"]):
            if expected is not None:
                assert got[f"g{i}"][0] == expected, (job["name"], job["dtype"], i)
