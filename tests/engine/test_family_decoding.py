"""LLaDA2.x's and Dream's own decoding through the engine (LLM.generate):
every golden generate case token for token, alone and batched with
requests of other settings; LLaDA2.1 editing and sampled decoding against
the transcriptions in sampler/reference_family.py on inputs where edits
happen; Dream's origin with the golden's recorded draws injected."""
from __future__ import annotations

import pytest
import torch

import sampler.block_diffusion as block_diffusion
from sampler.reference_family import dream_generate, llada2_generate
from server.engine.llm import LLM
from tests.conftest import golden_cases, golden_path

pytestmark = pytest.mark.golden
_LLMS: dict[tuple[str, str], LLM] = {}


def golden_llm(name: str, dtype: str) -> LLM:
    if (name, dtype) not in _LLMS:
        _LLMS[(name, dtype)] = LLM(str(golden_path(name)), dtype=dtype, device="cpu")
    return _LLMS[(name, dtype)]


def cut(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def llada2_params(llm: LLM, case: dict, **kw):
    p = case["params"]
    editing = p.get("editing_threshold") if case["generate"] == "llada21" else None
    return llm.default_params(gen_length=p["gen_length"], block_length=p["block_length"], steps=p["steps"],
                              threshold=p["threshold"], editing_threshold=editing,
                              max_post_steps=p.get("max_post_steps", 16), num_to_transfer=p.get("num_to_transfer", 1),
                              **kw)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_llada2_golden_cases_alone_and_batched(dtype):
    llm = golden_llm("llada2", dtype)
    assert llm.engine.decoding_defaults["schedule"] == "llada2"
    cases = golden_cases("llada2")
    for case in cases:
        out = llm.generate([case["prompt"][0]], llada2_params(llm, case))[0]
        assert out.token_ids == cut(case["expected"][0], case["eos_id"]), case["name"]
    # One batch: every case twice (exact and prefix_cache: finished blocks' keys/values cached), with a
    # sampled request of other settings beside them.
    prompts = [c["prompt"][0] for c in cases] * 2 + [[3, 4, 5]]
    params = [llada2_params(llm, c) for c in cases] + [llada2_params(llm, c, decoding="prefix_cache") for c in cases]
    params.append(llm.default_params(gen_length=20, block_length=4, steps=2, temperature=1.0, seed=5))
    outs = llm.generate(prompts, params)
    for out, case in zip(outs, cases * 2):
        assert out.token_ids == cut(case["expected"][0], case["eos_id"]), case["name"]


def _oracle_llada2(llm: LLM, prompt: list[int], **kw) -> list[int]:
    model = llm.engine.model
    return cut(llada2_generate(lambda x, b: model.forward_dense(x, block_length=b), prompt,
                               mask_id=llm.engine.mask_id, eos_id=465, **kw), 465)


EDITING = [  # prompts of several lengths (grid offsets), low editing thresholds so tokens get re-written
    dict(prompt=[456, 194, 50, 438, 161, 225, 22, 126, 79, 452, 277, 259], editing_threshold=0.2, max_post_steps=16),
    dict(prompt=[170, 392, 200, 306, 192], editing_threshold=0.25, max_post_steps=1),
    dict(prompt=list(range(100, 116)), editing_threshold=0.3, max_post_steps=0),
    dict(prompt=[5, 77, 300], editing_threshold=0.2, max_post_steps=3, temperature=1.0, seed=7),
]


def test_llada21_editing_matches_the_transcription_where_edits_happen():
    llm = golden_llm("llada2", "float64")
    edits: dict[str, int] = {}
    last: dict[str, list[int]] = {}

    def count_edits(req_id, req):
        if req_id in last:
            edits[req_id] = edits.get(req_id, 0) + sum(a != b and a != req.mask_id for a, b in zip(last[req_id], req.canvas))
        last[req_id] = list(req.canvas)

    prompts = [c["prompt"] for c in EDITING]
    params = [llm.default_params(gen_length=20, block_length=8, steps=8, threshold=0.9,
                                 **{k: v for k, v in c.items() if k != "prompt"}) for c in EDITING]
    expected = [_oracle_llada2(llm, c["prompt"], gen_length=20, block_length=8, steps=8, threshold=0.9,
                               **{k: v for k, v in c.items() if k != "prompt"}) for c in EDITING]
    alone = [llm.generate([p], q, on_step=count_edits)[0].token_ids for p, q in zip(prompts, params)]
    assert alone == expected
    assert len(edits) == len(EDITING) and all(n > 0 for n in edits.values())  # every request edited tokens
    cached = [llm.default_params(**{**q.__dict__, "decoding": "prefix_cache"}) for q in params]
    assert [o.token_ids for o in llm.generate(prompts * 2, params + cached)] == expected * 2


def test_llada2_sampling_matches_the_transcription():
    llm = golden_llm("llada2", "float32")
    prompt = [11, 22, 33, 44, 55]
    for kw in (dict(temperature=0.8, top_k=20, seed=1), dict(temperature=1.5, top_p=0.8, seed=2, threshold=0.5)):
        kw = dict(gen_length=16, block_length=4, steps=4) | kw
        out = llm.generate([prompt], llm.default_params(**kw))[0]
        assert out.token_ids == _oracle_llada2(llm, prompt, **kw)


def dream_rows(case: dict):
    for r, row in enumerate(case["prompt"]):
        start = 0 if case["attention_mask"] is None else case["attention_mask"][r].index(1)
        yield row[start:], case["expected"][r][len(row):]


def dream_params(llm: LLM, case: dict, **kw):
    p = case["params"]
    return llm.default_params(gen_length=p["max_new_tokens"], steps=p["steps"], eps=p["eps"], remasking=p["alg"],
                              alg_temp=p["alg_temp"] or 0.0, temperature=p["temperature"], top_p=p["top_p"] or 1.0,
                              top_k=p["top_k"] or 0, **kw)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dream_golden_cases_alone_and_batched(dtype):
    llm = golden_llm("dream", dtype)
    assert llm.engine.decoding_defaults["schedule"] == "dream"
    eos = llm.engine.stop_ids
    prompts, params, expected = [], [], []
    for case in golden_cases("dream"):
        if case["params"]["alg"] == "origin":
            continue  # its draws are torch.rand's: test_dream_origin_with_the_recorded_draws
        for prompt, gen in dream_rows(case):
            # ignore_eos: the whole canvas, as the reference returns it; else cut before the first EOS.
            out = llm.generate([prompt], dream_params(llm, case, ignore_eos=True))[0]
            assert out.token_ids == gen, case["name"]
            prompts.append(prompt)
            params.append(dream_params(llm, case))
            expected.append(next((gen[:i] for i, t in enumerate(gen) if t in eos), gen))
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected


def test_dream_origin_with_the_recorded_draws(monkeypatch):
    """The engine's origin coins are Philox draws; with the golden's
    torch.rand draws injected it reproduces the golden case."""
    llm = golden_llm("dream", "float64")
    for case in golden_cases("dream"):
        if case["params"]["alg"] != "origin":
            continue
        draws = iter(case["rand_draws_per_step"])

        def recorded(seed, offset):
            values = next(draws)
            assert len(values) == offset.numel()  # one coin per masked position, in canvas order
            return torch.tensor(values, dtype=torch.float32)

        monkeypatch.setattr(block_diffusion, "philox_uniform", recorded)
        (prompt, gen), = dream_rows(case)
        assert llm.generate([prompt], dream_params(llm, case, ignore_eos=True))[0].token_ids == gen


def test_dream_random_choices_match_the_transcription():
    """origin's coins, alg_temp's draws and sampled tokens from the project's
    streams: the engine equals the transcription given the same streams."""
    llm = golden_llm("dream", "float32")
    prompt = [151, 235, 90, 35, 44, 242]
    for kw in (dict(remasking="origin", seed=3), dict(remasking="entropy", alg_temp=0.5, seed=4),
               dict(remasking="maskgit_plus", temperature=0.7, top_p=0.9, top_k=30, seed=5)):
        kw = dict(gen_length=12, steps=6) | kw
        out = llm.generate([prompt], llm.default_params(ignore_eos=True, **kw))[0]
        ref = dream_generate(llm.engine.model.forward_dense, torch.tensor([prompt]), 12, 6,
                             alg=kw["remasking"], alg_temp=kw.get("alg_temp", 0.0), temperature=kw.get("temperature", 0.0),
                             top_p=kw.get("top_p"), top_k=kw.get("top_k"), mask_id=llm.engine.mask_id, seed=kw["seed"])
        assert out.token_ids == ref[0, len(prompt):].tolist(), kw


def test_schedules_refused_where_they_do_not_fit():
    dream = golden_llm("dream", "float32")
    with pytest.raises(ValueError, match="schedule: 'llada2' needs a block-causal model"):
        dream.generate([[1, 2]], dream.default_params(schedule="llada2", remasking="threshold_quota", gen_length=8))
