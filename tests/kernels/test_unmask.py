"""The fused unmask kernels against their twins: x0 and confidences per row,
the in-kernel Gumbel noise, and the per-sequence commit selection."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels import reference, unmask  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOLERANCE = 2e-5  # on the float32 outputs, whatever the logits' dtype
GPU_TOLERANCE = 1e-4  # sums over 126k exponentials, in another order and with ex2.approx


def make_rows(device, num_rows, vocab, dtype=torch.float32, temperature="mixed", seed=0):
    """Random logits with a spread like a trained LM head, and per-row
    sampling state; temperature "mixed" alternates greedy and sampled rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=gen) * 4).to(device=device, dtype=dtype)
    if temperature == "mixed":
        temp = torch.tensor([0.0, 0.7, 1.0, 1.5] * num_rows)[:num_rows]
    else:
        temp = torch.full((num_rows,), float(temperature))
    seeds = torch.randint(0, 2**62, (num_rows,), generator=gen)
    row_offset = torch.randint(0, 4096, (num_rows,), generator=gen)
    return logits, temp.to(device), seeds.to(device), row_offset.to(device)


def assert_scores_match(rows, banned_ids=None, tol=TOLERANCE, **launch):
    kwargs = dict(banned_ids=banned_ids, with_margin=True, with_entropy=True)
    out = unmask.unmask_scores(*rows, **kwargs, **launch)
    want = reference.unmask_scores(*rows, **kwargs)
    assert out["x0"].dtype == torch.int64
    assert torch.equal(out["x0"], want["x0"])
    for name in ("prob", "margin", "entropy"):
        assert out[name].dtype == torch.float32
        torch.testing.assert_close(out[name], want[name], atol=tol, rtol=tol, msg=name)


CASES = {  # name -> make_rows arguments, banned ids and launch overrides
    "one_row_tiny_vocab": dict(num_rows=1, vocab=10),
    "greedy": dict(num_rows=6, vocab=1000, temperature=0.0, launch=dict(block_v=256)),
    "sampled": dict(num_rows=6, vocab=1000, temperature=1.0, launch=dict(block_v=256)),
    "mixed_vocab_not_tile_multiple": dict(num_rows=5, vocab=1001, launch=dict(block_v=128)),
    "banned_ids": dict(num_rows=4, vocab=700, banned=[0, 699, 17, 311], launch=dict(block_v=128)),
    "vocab_chunks": dict(num_rows=3, vocab=3001, launch=dict(block_v=256, num_chunks=3)),
    "vocab_of_one": dict(num_rows=2, vocab=1),
}


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=[pytest.mark.gpu, requires_cuda]),
])
@pytest.mark.parametrize("case", list(CASES))
def test_scores_match_twin(case, dtype, device):
    spec = dict(CASES[case])
    launch = spec.pop("launch", {})
    banned = spec.pop("banned", None)
    rows = make_rows(device, dtype=dtype, **spec)
    banned_ids = None if banned is None else torch.tensor(banned, device=device)
    assert_scores_match(rows, banned_ids, **launch)


@pytest.mark.parametrize("num_chunks", [1, 4])
def test_ties_go_to_the_lowest_index(num_chunks, device):
    logits = torch.zeros(3, 512, device=device)
    logits[0, [7, 300, 500]] = 2.0  # a three-way tie across chunks
    logits[1] = 1.0  # all equal
    logits[2, [100, 101]] = 5.0
    rows = (logits, torch.zeros(3, device=device), torch.zeros(3, dtype=torch.int64, device=device),
            torch.zeros(3, dtype=torch.int64, device=device))
    out = unmask.unmask_scores(*rows, with_margin=True, block_v=64, num_chunks=num_chunks)
    assert out["x0"].tolist() == [7, 0, 100]
    assert out["margin"].tolist() == [0.0, 0.0, 0.0]
    assert_scores_match(rows, block_v=64, num_chunks=num_chunks)


def test_noise_is_the_twins_noise(device):
    seeds = torch.tensor([0, 1, 2**40 + 3, 2**62 - 1], device=device)
    row_offset = torch.tensor([0, 5, 77, 4095], device=device)
    noise = unmask.gumbel_noise(seeds, row_offset, 3000)
    want = reference.gumbel_noise(seeds, row_offset, 3000)
    # Same Philox uniforms; only the two log implementations round differently.
    torch.testing.assert_close(noise, want, atol=1e-6, rtol=1e-6)
    # With flat logits and T = 1, x0 is the argmax of the noise itself.
    flat = torch.zeros(4, 3000, device=device)
    out = unmask.unmask_scores(flat, torch.ones(4, device=device), seeds, row_offset, block_v=512)
    assert torch.equal(out["x0"], want.argmax(dim=1))


def test_unmask_dispatch_and_float64(device, triton_backend):
    rows = make_rows(device, 3, 300)
    out = triton_backend.unmask_scores(*rows, with_margin=True)
    assert set(out) == {"x0", "prob", "margin"}
    assert torch.equal(out["x0"], reference.unmask_scores(*rows)["x0"])
    double = (rows[0].double(),) + rows[1:]
    assert torch.equal(triton_backend.unmask_scores(*double)["x0"], reference.unmask_scores(*double)["x0"])


SELECT_CASES = {  # name -> (confidence, row_seq, quota, threshold)
    "k_zero_and_all": ([0.1, 0.9, 0.5, 0.3, 0.8], [0, 0, 0, 1, 1], [0, 5], None),
    "ties_to_lower_row": ([0.5, 0.7, 0.5, 0.5, 0.7, 0.2], [0, 0, 0, 1, 1, 1], [2, 2], None),
    "interleaved_sequences": ([0.3, 0.9, 0.1, 0.8, 0.6, 0.4, 0.7], [1, 0, 1, 2, 0, 1, 2], [1, 2, 1], None),
    "neg_inf_rows": ([float("-inf"), 0.2, float("-inf"), 0.9], [0, 0, 1, 1], [1, 1], None),
    "threshold": ([0.95, 0.2, 0.91, 0.3, 0.1, 0.05], [0, 0, 0, 1, 1, 1], [1, 1], [0.9, 0.5]),
    "threshold_or_quota": ([0.95, 0.2, 0.91, 0.3, 0.1, 0.05], [0, 0, 0, 1, 1, 1], [1, 2], [0.9, 0.0]),
    "one_row": ([0.4], [0], [1], [0.5]),
}


@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_select_matches_twin(case, device):
    conf, row_seq, quota, threshold = SELECT_CASES[case]
    args = (torch.tensor(conf, device=device), torch.tensor(row_seq, device=device),
            torch.tensor(quota, device=device),
            None if threshold is None else torch.tensor(threshold, device=device))
    commit = unmask.select_commits(*args)
    assert commit.dtype == torch.bool
    assert torch.equal(commit, reference.select_commits(*args))


def test_select_random_batches_and_canvas(device, triton_backend):
    gen = torch.Generator().manual_seed(1)
    num_rows, num_seqs = 300, 7
    conf = (torch.rand(num_rows, generator=gen) * 8).round() / 8  # many ties
    row_seq = torch.randint(0, num_seqs, (num_rows,), generator=gen)
    quota = torch.randint(0, 40, (num_seqs,), generator=gen)
    threshold = torch.where(torch.arange(num_seqs) % 2 == 0, 0.6, 0.0)
    positions = torch.randperm(2 * num_rows, generator=gen)[:num_rows]
    x0 = torch.randint(1, 1000, (num_rows,), generator=gen)
    args = [t.to(device) for t in (conf, row_seq, quota, threshold)]
    canvas = torch.zeros(2, num_rows, dtype=torch.int64, device=device)  # (num_seqs_of_canvas, length)
    commit = triton_backend.select_commits(*args, canvas=canvas, positions=positions.to(device),
                                           x0=x0.to(device))
    want = reference.select_commits(*args)
    assert torch.equal(commit, want)
    want_canvas = reference.commit_to_canvas(torch.zeros_like(canvas), positions.to(device), x0.to(device), want)
    assert torch.equal(canvas, want_canvas)
    assert unmask.select_commits(torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int64, device=device),
                                 quota.to(device)).shape == (0,)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("num_rows", [32, 2048])
def test_llada_vocab_on_gpu(dtype, num_rows, device):
    rows = make_rows(device, num_rows, 126464, dtype=dtype)
    assert_scores_match(rows, banned_ids=torch.tensor([126081], device=device), tol=GPU_TOLERANCE)


@pytest.mark.gpu
@requires_cuda
def test_select_many_rows_on_gpu(device):
    gen = torch.Generator().manual_seed(2)
    conf = (torch.rand(8192, generator=gen) * 64).round()
    row_seq = torch.arange(8192) // 32
    quota = torch.randint(0, 33, (256,), generator=gen)
    args = [t.to(device) for t in (conf, row_seq, quota)]
    assert torch.equal(unmask.select_commits(*args), reference.select_commits(*args))
