"""Captured static use steps (server/engine/graphs.py) through the engine,
with the CPU stand-in for a CUDA graph: capture runs the step's closure
once, every replay runs the same closure on the same buffers with the new
step's contents. So a value the step froze at capture (a length, a page, a
position, a batch size) instead of reading it from its buffers changes the
tokens. The engine's tokens must equal the eager ragged engine's, step
after step, while the batch moves between buckets."""
from __future__ import annotations

import pytest

from sampler.params import DiffusionParams
from server.engine.graphs import StandInGraph, StepGraphs
from server.engine.llm import LLM
from tests.conftest import golden_path

PROMPTS = [[204, 68, 268, 43, 100, 190, 179], [35, 225, 26, 25, 197], [221, 63, 12, 244], [58, 1, 2, 3, 4, 5],
           [12, 244, 58, 1, 2]]


def _count_steps(monkeypatch) -> dict[str, list[int]]:
    """The batch size of every replayed step."""
    seen: dict[str, list[int]] = {"replayed": []}
    real = StepGraphs.run

    def run(self, bucket, width, ids, positions, cache_seqlens, pages):
        seen["replayed"].append(len(pages))
        return real(self, bucket, width, ids, positions, cache_seqlens, pages)

    monkeypatch.setattr(StepGraphs, "run", run)
    return seen


def _params(decoding: str) -> list[DiffusionParams]:
    # Answers of 3, 2, 1, 1 and 3 blocks of 8, one token a step: the batch
    # shrinks from 5 requests (bucket 8) to 3 (bucket 4) to 2 (bucket 2) at
    # block boundaries; two requests sample (their noise is per request).
    lengths = [24, 16, 8, 8, 24]
    return [DiffusionParams(gen_length=n, block_length=8, steps=n, decoding=decoding, seed=i,
                            temperature=0.8 * (i % 2), ignore_eos=True) for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def eager():
    return LLM(str(golden_path("llada")), dtype="float32", device="cpu", max_num_seqs=8)


def _graphed(max_pages: int | None = None) -> LLM:
    llm = LLM(str(golden_path("llada")), dtype="float32", device="cpu", max_num_seqs=8, enforce_eager=False)
    runner = llm.engine.runner
    pages = max_pages or -(-llm.engine.max_model_len // runner.kv_cache.page_size)
    graphs = runner.capture_graphs([8], pages, StandInGraph)
    assert sorted(graphs.graphs) == [(1, 8), (2, 8), (4, 8), (8, 8)]
    return llm


@pytest.mark.parametrize("decoding", ["dual_cache", "prefix_cache"])
def test_graphed_steps_equal_the_eager_engine(decoding, eager, monkeypatch):
    """dual_cache: every step after a block's fill is replayed; prefix_cache:
    the last block's steps (block + suffix is the block). Token for token
    the eager ragged engine's, across buckets 8, 4, 2 and 1."""
    seen = _count_steps(monkeypatch)
    params = _params(decoding)
    expected = [o.token_ids for o in eager.generate(PROMPTS, params)]
    llm = _graphed()
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expected
    if decoding == "dual_cache":
        # 7 use steps per block: 5 requests in block 1, 3 in block 2, 2 in block 3.
        assert seen["replayed"] == [5] * 7 + [3] * 7 + [2] * 7
    else:  # only block 3 has every request in its last block (widths differ before)
        assert seen["replayed"] == [2] * 7
    # One request alone (bucket 1), then the batch again: the buffers carry nothing over.
    assert llm.generate([PROMPTS[1]], params[1])[0].token_ids == expected[1]
    assert [o.token_ids for o in llm.generate(PROMPTS[::-1], params[::-1])] == expected[::-1]
    assert 1 in seen["replayed"]


def test_a_step_past_the_static_table_runs_eagerly(eager, monkeypatch):
    """A static table of 1 page (16 slots) per sequence: steps whose
    requests all fit replay the graph; a step with a longer canvas (7 + 24
    tokens: 2 pages) runs eagerly, padded, with the same tokens."""
    seen = _count_steps(monkeypatch)
    params = [DiffusionParams(gen_length=n, block_length=8, steps=n, decoding="dual_cache", seed=i, ignore_eos=True)
              for i, n in enumerate([8, 24])]
    prompts = [PROMPTS[2], PROMPTS[0]]
    expected = [o.token_ids for o in eager.generate(prompts, params)]
    llm = _graphed(max_pages=1)
    calls = []
    model = llm.engine.model
    real = model.forward
    model.forward = lambda ids, *a, **k: calls.append(ids.numel()) or real(ids, *a, **k)
    assert [o.token_ids for o in llm.generate(prompts[:1], params[:1])] == expected[:1]
    assert seen["replayed"] == [1] * 7 and calls == [12]  # the fill alone ran eagerly
    calls.clear()
    assert [o.token_ids for o in llm.generate(prompts[1:], params[1:])] == expected[1:]
    assert seen["replayed"] == [1] * 7 and calls.count(8) == 21  # 3 blocks x 7 use steps, eager, bucket 1


def test_capture_needs_a_static_step():
    """Graphs are refused where there is nothing static to capture."""
    llm = LLM(str(golden_path("llada")), dtype="float32", device="cpu", max_num_seqs=4)
    with pytest.raises(ValueError, match="buckets"):
        llm.engine.runner.capture_graphs([8], 4, StandInGraph)


def test_the_captured_step_reads_nothing_on_the_host():
    """On the meta device any read of a tensor's values on the host
    (``.item()``, ``int(t)``, ``.tolist()``, a shape that depends on data)
    raises: capture and replay run whole there (the twin's attention), so
    the step holds no sync that a CUDA graph capture would refuse. The
    eager forward, which sizes its rotary table from the positions, does not."""
    import numpy as np
    import torch

    from server.models.kv_cache import PagedKVCache
    from server.models.llada import LLaDAConfig, LLaDAModel

    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=64,
                      mask_token_id=63)
    cfg.validate()
    meta = torch.device("meta")
    with meta:
        model = LLaDAModel(cfg)
    kv = PagedKVCache.allocate(cfg.n_layers, 8, 4, cfg.n_kv_heads, cfg.head_dim, torch.float32, meta)
    graphs = StepGraphs(model, kv, [1, 2], [8], 4, StandInGraph)
    graphs.capture()
    logits = graphs.run(2, 8, [5] * 16, np.arange(16), [3], [[1, 2]])
    assert logits.shape == (16, 64) and logits.device == meta
    with pytest.raises(RuntimeError, match="meta"):
        model(torch.zeros(8, dtype=torch.long, device=meta), torch.arange(8, device=meta), [0, 8])
