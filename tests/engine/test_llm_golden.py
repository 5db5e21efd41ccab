"""The batched engine against the reference: the golden cases of every set
decoded with LLaDA's generate() (LLaDA, LLaDA-MoE) token for token, alone and
as one ragged batch, and at temperature > 0 against sampler/reference.py
(same counter-based noise)."""
from __future__ import annotations

import json

import pytest
import torch

from sampler.params import DiffusionParams
from sampler.reference import generate
from server.engine.llm import LLM
from tests.conftest import golden_path, golden_rows

GOLDEN_EOS = 300
LLADA_SAMPLER_SETS = ["llada", "llada-moe"]


def params_of(p: dict, **kw) -> DiffusionParams:
    return DiffusionParams(gen_length=p["gen_length"], steps=p["steps"], block_length=p["block_length"],
                           temperature=p["temperature"], cfg_scale=p["cfg_scale"], remasking=p["remasking"], **kw)


def eos_of(name: str) -> int:
    return json.loads((golden_path(name) / "generation_config.json").read_text())["eos_token_id"]


def cut(ids: list[int], eos: int = GOLDEN_EOS) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


@pytest.fixture(scope="module", params=["float64", "float32"])
def llm(request, golden_dir):
    return LLM(str(golden_dir), dtype=request.param, device="cpu")


_LLMS: dict[tuple[str, str], LLM] = {}


def golden_llm(name: str, dtype: str) -> LLM:
    if (name, dtype) not in _LLMS:
        _LLMS[(name, dtype)] = LLM(str(golden_path(name)), dtype=dtype, device="cpu")
    return _LLMS[(name, dtype)]


GOLDEN_ROWS = [(name, row) for name in LLADA_SAMPLER_SETS for row in golden_rows(name)]


@pytest.mark.golden
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,row", GOLDEN_ROWS, ids=lambda x: x[0] if isinstance(x, tuple) else x)
def test_engine_matches_golden_alone(name, row, dtype):
    _, prompt, p, expected = row
    eos = eos_of(name)
    out = golden_llm(name, dtype).generate([prompt], params_of(p))[0]
    assert out.token_ids == cut(expected, eos)
    assert out.text is None and out.finish_reason == ("stop" if eos in expected else "length")


@pytest.mark.golden
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", LLADA_SAMPLER_SETS)
def test_engine_matches_golden_in_one_ragged_batch(name, dtype):
    rows = golden_rows(name)
    outs = golden_llm(name, dtype).generate([r[1] for r in rows], [params_of(r[2]) for r in rows])
    assert [o.token_ids for o in outs] == [cut(r[3], eos_of(name)) for r in rows]


def _reference(llm, prompt, params):
    x = generate(llm.engine.model.forward_dense, torch.tensor([prompt]), None, steps=params.steps,
                 gen_length=params.gen_length, block_length=params.block_length, temperature=params.temperature,
                 cfg_scale=params.cfg_scale, remasking=params.remasking, mask_id=llm.engine.mask_id, seed=params.seed)
    return cut(x[0, len(prompt):].tolist())


SAMPLED = [
    dict(gen_length=16, steps=16, block_length=8, temperature=1.0, seed=1),
    dict(gen_length=20, steps=10, block_length=8, temperature=0.7, seed=2),  # short last block, uneven steps
    dict(gen_length=16, steps=8, block_length=16, temperature=0.0, remasking="random", seed=3),
    dict(gen_length=12, steps=12, block_length=4, temperature=2.0, remasking="random", cfg_scale=0.5, seed=4),
    # More steps than tokens: zero-quota steps are skipped, yet still count in the noise's step index.
    dict(gen_length=8, steps=24, block_length=4, temperature=1.0, seed=5),
]


@pytest.mark.parametrize("kw", SAMPLED, ids=lambda kw: f"T{kw['temperature']}-{kw.get('remasking', 'lc')}-s{kw['seed']}")
def test_engine_matches_reference_when_sampling(llm, kw):
    prompt = [204, 68, 268, 43, 100, 190, 179]
    params = DiffusionParams(**kw)
    assert llm.generate([prompt], params)[0].token_ids == _reference(llm, prompt, params)


def test_batch_invariance_and_seeds(golden_dir):
    llm = LLM(str(golden_dir), dtype="float32", device="cpu")
    prompts = [[204, 68, 268], [35, 225, 26, 25, 197, 4, 257], [221, 63], [12, 244, 58, 1, 2, 3, 4, 5, 6, 7]]
    params = [DiffusionParams(gen_length=16 + 4 * i, block_length=8, temperature=0.9, seed=10 + i,
                              remasking=["low_confidence", "random"][i % 2]) for i in range(4)]
    alone = [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert together == alone
    other_seed = DiffusionParams(gen_length=16, block_length=8, temperature=0.9, seed=999)
    assert llm.generate([prompts[0]], other_seed)[0].token_ids != alone[0]


def test_early_stop_finishes_at_first_final_eos(golden_dir):
    """With an EOS in the answer, the request stops as soon as the EOS and
    everything before it is committed, with the reference's tokens."""
    llm = LLM(str(golden_dir), dtype="float32", device="cpu")
    # Make the id the golden model predicts most often an end token, so answers stop early.
    llm.engine.stop_ids = frozenset({214})
    prompt = [204, 68, 268, 43, 100, 190, 179, 266, 147, 12, 244, 58]
    params = DiffusionParams(gen_length=32, steps=32, block_length=8)
    out = llm.generate([prompt], params)[0]
    ref = generate(llm.engine.model.forward_dense, torch.tensor([prompt]), None, steps=32, gen_length=32,
                   block_length=8, mask_id=310)[0, len(prompt):].tolist()
    assert 214 in ref
    assert out.token_ids == ref[: ref.index(214)] and out.finish_reason == "stop"
    assert out.num_steps < 32
