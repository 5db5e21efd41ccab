"""Batch-size buckets (--no-enforce-eager): static cache use steps padded to
their bucket give every request the tokens the ragged engine gives it, in
every decoding mode (LLaDA's exact, prefix_cache, dual_cache; LLaDA2's
prefix_cache over its block grid, editing included), and the padded steps
really are padded."""
from __future__ import annotations

import pytest

from sampler.params import DiffusionParams
from server.engine.buckets import batch_buckets, bucket_for, static_width
from server.engine.llm import LLM
from tests.conftest import golden_path


def test_buckets_cover_every_batch_size():
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    buckets = batch_buckets(48)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 16, 17, 33, 48)] == [1, 2, 4, 8, 16, 32, 48, 48]
    with pytest.raises(ValueError):
        bucket_for(49, buckets)


def _record_forwards(llm: LLM) -> list[tuple[int, int]]:
    """(packed sequences, tokens) of every forward."""
    calls = []
    model = llm.engine.model
    real = model.forward

    def forward(input_ids, positions, cu_seqlens, *args, **kwargs):
        calls.append((len(cu_seqlens) - 1, input_ids.numel()))
        return real(input_ids, positions, cu_seqlens, *args, **kwargs)

    model.forward = forward
    return calls


PROMPTS = [[204, 68, 268, 43, 100, 190, 179], [35, 225, 26, 25, 197], [221, 63, 12, 244], [58, 1, 2, 3, 4, 5],
           [12, 244, 58, 1, 2]]


@pytest.mark.parametrize("decoding", ["exact", "prefix_cache", "dual_cache"])
def test_bucketed_llada_equals_ragged(decoding):
    """Five requests (a bucket of 8, so three padding blocks), a sampled one
    among them, some joining late: token for token the ragged engine's."""
    params = [DiffusionParams(gen_length=16, block_length=8, steps=8, decoding=decoding, seed=i,
                              temperature=0.8 * (i % 2)) for i in range(len(PROMPTS))]
    ragged = LLM(str(golden_path("llada")), dtype="float32", device="cpu", max_num_seqs=8)
    bucketed = LLM(str(golden_path("llada")), dtype="float32", device="cpu", max_num_seqs=8, enforce_eager=False)
    assert ragged.engine.runner.bucket_sizes is None and bucketed.engine.runner.bucket_sizes == [1, 2, 4, 8]
    calls = _record_forwards(bucketed)
    expected = [o.token_ids for o in ragged.generate(PROMPTS, params)]
    assert [o.token_ids for o in bucketed.generate(PROMPTS, params)] == expected
    padded = [(n, t) for n, t in calls if n == 8 and t == 8 * 8]
    if decoding == "exact":  # whole canvases of different lengths: never static
        assert not padded
    else:  # dual_cache blocks; prefix_cache's last block, where block + suffix is the block
        assert padded, "no step was padded to its bucket"
    # Alone (a bucket of one: nothing to pad).
    assert [bucketed.generate([p], q)[0].token_ids for p, q in zip(PROMPTS[:2], params[:2])] == expected[:2]


@pytest.mark.golden
def test_bucketed_llada2_prefix_cache_equals_ragged():
    """LLaDA2's prefix_cache use steps compute one grid block each: static
    steps; with and without token editing."""
    from tests.engine.test_family_decoding import llada2_params

    path = golden_path("llada2")
    ragged = LLM(str(path), dtype="float32", device="cpu", max_num_seqs=4)
    bucketed = LLM(str(path), dtype="float32", device="cpu", max_num_seqs=4, enforce_eager=False)
    calls = _record_forwards(bucketed)
    case = {"generate": "llada2", "params": dict(gen_length=16, block_length=8, steps=8, threshold=0.95)}
    edit_case = {"generate": "llada21", "params": dict(gen_length=16, block_length=8, steps=8, threshold=0.7,
                                                       editing_threshold=0.5, max_post_steps=2)}
    params = [llada2_params(ragged, c, decoding="prefix_cache") for c in (case, edit_case, case)]
    prompts = PROMPTS[:3]
    expected = [o.token_ids for o in ragged.generate(prompts, params)]
    assert [o.token_ids for o in bucketed.generate(prompts, params)] == expected
    assert any(n == 4 for n, _ in calls), "no step was padded to its bucket"


def test_static_width_needs_equal_use_steps():
    from server.engine.messages import ScheduledSeq

    def seq(action, cfg=0.0):
        return ScheduledSeq(req_id="r", canvas=[1] * 8, prompt_len=2, rows=[2], quota=1, temperature=0.0, top_k=0,
                            top_p=1.0, seed=0, random_seed=0, remasking="low_confidence", cfg_scale=cfg,
                            threshold=0.0, factor=0.0, block=(2, 6), decoding="dual_cache", cache_action=action, pages=[0])

    assert static_width([seq("use"), seq("use")], [4, 4]) == 4
    assert static_width([seq("use"), seq("use")], [4, 3]) is None
    assert static_width([seq("use"), seq("fill")], [4, 4]) is None
    assert static_width([seq("use", cfg=1.0)], [4]) is None
    assert static_width([], []) is None
