"""ModelFacts: the immutable snapshot the API sees, and its checks, which
refuse a request in the engine's own field names (the API names them its
way: max_tokens, requests[i].context, ...)."""
from __future__ import annotations

import dataclasses

import pytest

from sampler.params import DiffusionParams, LikelihoodParams
from server.config import ModelConfig, SchedulerConfig
from server.engine.engine import LLMEngine
from server.engine.facts import RequestError

API_NAMES = ("max_tokens", "max_completion_tokens", "requests[", "messages")


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    from tests.conftest import make_random_checkpoint

    ckpt = make_random_checkpoint(tmp_path_factory.mktemp("facts") / "ckpt", max_sequence_length=64)
    sc = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=48, kv_cache_tokens=16, page_size=4)
    return LLMEngine(ModelConfig(str(ckpt), dtype="float32", device="cpu"), sc).facts


def refused(check, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        check(*args)
    assert not any(name in e.value.message for name in API_NAMES), e.value.message
    return e.value


@pytest.mark.parametrize("prompt,params,field,words", [
    ([5, 99], DiffusionParams(gen_length=8), "prompt", "outside the vocabulary [0, 64)"),
    ([5, 63], DiffusionParams(gen_length=8), "prompt", "mask token id 63"),
    ([5] * 40, DiffusionParams(gen_length=32), "gen_length", "72 exceeds the model's maximum length 64"),
    ([5], DiffusionParams(gen_length=24, block_length=8, cfg_scale=1.0), "gen_length", "max_num_batched_tokens 48"),
    ([5], DiffusionParams(gen_length=8, schedule="llada2", steps=8, block_length=8), "schedule", "block-causal"),
    ([5], DiffusionParams(gen_length=32, decoding="dual_cache"), "gen_length", "exceeds the KV cache"),
    ([5], DiffusionParams(gen_length=8, stop=("x",)), "stop", "tokenizer"),
])
def test_generation_refusals_name_the_engines_field(facts, prompt, params, field, words):
    e = refused(facts.check_generation, prompt, params)
    assert e.field == field and words in e.message, e.message
    assert str(e) == f"{field}: {e.message}"


def test_likelihood_refusals(facts):
    p = LikelihoodParams(mc_num=4)
    assert refused(facts.check_likelihood, [5, 99], [6], p).field == "context"
    assert refused(facts.check_likelihood, [5], [], p).field == "continuation"
    e = refused(facts.check_likelihood, [5] * 20, [6] * 10, p)  # 30 tokens x (sample + greedy) > 48
    assert e.field == "continuation" and "greedy check counted" in e.message
    facts.check_likelihood([5] * 20, [6] * 10, LikelihoodParams(mc_num=4, check_greedy=False))


def test_what_the_checks_pass_the_engine_runs(facts):
    facts.check_generation([5, 6], DiffusionParams(gen_length=8, block_length=4, decoding="dual_cache"))
    assert facts.blocks(2, DiffusionParams(gen_length=10, block_length=4)) == [(0, 4), (4, 8), (8, 10)]


def test_facts_cannot_change(facts):
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts.max_model_len = 1
    with pytest.raises(TypeError):
        facts.decoding_defaults["gen_length"] = 1
