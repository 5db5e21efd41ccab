"""The transcriptions of LLaDA2's, LLaDA2.1's and Dream's samplers
(sampler/reference_family.py) reproduce every golden generate case their
sets hold, on the project's model classes."""
from __future__ import annotations

import pytest
import torch

from sampler.reference_family import dream_generate, llada2_generate
from server.engine.llm import LLM
from tests.conftest import golden_cases, golden_path

pytestmark = pytest.mark.golden


@pytest.fixture(scope="module")
def llada2():
    return LLM(str(golden_path("llada2")), dtype="float64", device="cpu").engine.model


@pytest.fixture(scope="module")
def dream():
    return LLM(str(golden_path("dream")), dtype="float64", device="cpu").engine.model


def test_llada2_and_llada21_generate(llada2):
    cases = golden_cases("llada2")
    assert {c["generate"] for c in cases} <= {"llada2", "llada21"}
    for case in cases:
        p = case["params"]
        editing = p.get("editing_threshold") if case["generate"] == "llada21" else None
        out = llada2_generate(lambda x, b: llada2.forward_dense(x, block_length=b), case["prompt"][0],
                              p["gen_length"], p["block_length"], p["steps"], p["threshold"],
                              mask_id=case["mask_id"], eos_id=case["eos_id"], editing_threshold=editing,
                              max_post_steps=p.get("max_post_steps", 16), num_to_transfer=p.get("num_to_transfer", 1))
        assert out == case["expected"][0], case["name"]


def test_dream_generate(dream):
    for case in golden_cases("dream"):
        p = case["params"]
        if p["alg"] == "origin":  # the recorded draws span the batch, row-major: decode it as one
            assert case["attention_mask"] is None
            x = dream_generate(dream.forward_dense, torch.tensor(case["prompt"]), p["max_new_tokens"], p["steps"],
                               p["eps"], "origin", 0.0, p["temperature"], p["top_p"], p["top_k"],
                               case["mask_token_id"], draws=case["rand_draws_per_step"])
            assert x.tolist() == case["expected"], case["name"]
            continue
        for r, row in enumerate(case["prompt"]):
            start = 0 if case["attention_mask"] is None else case["attention_mask"][r].index(1)
            x = dream_generate(dream.forward_dense, torch.tensor([row[start:]]), p["max_new_tokens"], p["steps"],
                               p["eps"], p["alg"], p["alg_temp"] or 0.0, p["temperature"], p["top_p"], p["top_k"],
                               case["mask_token_id"])
            assert x[0, len(row) - start:].tolist() == case["expected"][r][len(row):], (case["name"], r)
