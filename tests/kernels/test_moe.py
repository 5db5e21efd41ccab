"""The fused MoE kernel against its twin, and the twin against an
independent float64 loop over tokens and their experts: expert counts 8-256,
top-k 1-8, uneven routing (experts over several blocks, experts with no
token), a single token, non-power-of-two widths."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels import moe, reference  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative, on the whole output


def make_moe(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, skew: float = 0.0,
             seed: int = 0, device="cpu", dtype=torch.float32, weight_dtype=torch.float32):
    """Random experts and a routing of distinct experts per token; skew > 0
    draws experts with probability ~ exp(-skew * e), so a few experts take
    most pairs and many get none."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    prob = torch.exp(-skew * torch.arange(num_experts, dtype=torch.float64)).expand(num_tokens, -1)
    topk_ids = torch.multinomial(prob, top_k, replacement=False, generator=gen)
    topk_weights = torch.rand(num_tokens, top_k, generator=gen)
    to = dict(device=device, dtype=dtype)
    return (x.to(**to), w_gate_up.to(**to), w_down.to(**to), topk_ids.to(device),
            topk_weights.to(device=device, dtype=weight_dtype))


def loop_moe(x, w_gate_up, w_down, topk_ids, topk_weights) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * down_e(silu(gate_e x[t]) * up_e x[t]), token by token, in float64."""
    x, w_gate_up, w_down, topk_weights = (t.double() for t in (x, w_gate_up, w_down, topk_weights))
    inter = w_down.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k, e in enumerate(topk_ids[t].tolist()):
            gate, up = w_gate_up[e, :inter] @ x[t], w_gate_up[e, inter:] @ x[t]
            out[t] += topk_weights[t, k] * (w_down[e] @ (F.silu(gate) * up))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


CASES = {  # name -> make_moe arguments (num_tokens, hidden, inter, num_experts, top_k, skew) and launch overrides
    "e8_k1": dict(shape=(7, 32, 16, 8, 1, 0.0)),
    "e8_k2_one_token": dict(shape=(1, 32, 16, 8, 2, 0.0)),
    "e16_k4_uneven_multiblock": dict(shape=(40, 32, 16, 16, 4, 0.8), block_m=16),
    "e64_k6_mostly_empty": dict(shape=(3, 48, 24, 64, 6, 0.0)),
    "e128_k8_uneven_wide": dict(shape=(9, 160, 80, 128, 8, 0.05)),
    "e256_k8": dict(shape=(6, 64, 32, 256, 8, 0.0)),
}


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=[pytest.mark.gpu, requires_cuda]),
])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_twin(case, dtype, device):
    spec = CASES[case]
    args = make_moe(*spec["shape"], device=device, dtype=dtype)
    out = moe.fused_moe(*args, block_m=spec.get("block_m"))
    want = reference.fused_moe(*args)
    assert out.dtype == dtype and out.shape == want.shape
    assert rel(out, want) < TOLERANCE[dtype], case
    if dtype == torch.float32:  # and row by row: no token's output leans on the others'
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_uneven_routing_really_is():
    """The uneven case covers what it claims: an expert over several blocks,
    experts with no pair at all."""
    _, _, _, topk_ids, _ = make_moe(*CASES["e16_k4_uneven_multiblock"]["shape"])
    counts = torch.bincount(topk_ids.reshape(-1), minlength=16)
    assert counts.max() > 2 * 16 and (counts == 0).any()


@pytest.mark.parametrize("block_m", [16, 32])
def test_align_groups_pairs_by_expert(block_m, device):
    num_experts, top_k = 16, 3
    topk_ids = make_moe(30, 16, 16, num_experts, top_k, skew=0.5, seed=3, device=device)[3]
    sorted_pairs, block_expert = moe.align(topk_ids, num_experts, block_m)
    num_pairs = topk_ids.numel()
    assert sorted_pairs.numel() == moe.max_padded_rows(num_pairs, num_experts, block_m)
    assert block_expert.numel() * block_m == sorted_pairs.numel()
    flat = topk_ids.reshape(-1).cpu()
    rows, experts = sorted_pairs.cpu().view(-1, block_m), block_expert.cpu()
    real = rows < num_pairs
    assert sorted(rows[real].tolist()) == list(range(num_pairs))  # every pair exactly once
    counts = torch.bincount(flat, minlength=num_experts)
    used = int(((counts + block_m - 1) // block_m).sum())  # blocks the routing needs, empty experts none
    assert (experts[:used] < num_experts).all() and (experts[used:] == num_experts).all()
    assert not real[used:].any()
    for b in range(used):
        pairs = rows[b][real[b]]
        assert len(pairs) and (flat[pairs] == experts[b]).all()
        assert torch.equal(pairs, pairs.sort().values)  # stable: pairs keep their order
    assert torch.equal(experts[:used], experts[:used].sort().values)


@pytest.mark.parametrize("case", ["e8_k1", "e16_k4_uneven_multiblock", "e64_k6_mostly_empty", "e256_k8"])
def test_twin_matches_loop_in_float64(case):
    args = make_moe(*CASES[case]["shape"], seed=7, dtype=torch.float64, weight_dtype=torch.float64)
    torch.testing.assert_close(reference.fused_moe(*args), loop_moe(*args), atol=1e-12, rtol=1e-12)


def test_weights_in_model_dtype_and_zero_tokens(device):
    """LLaDA-MoE passes its weights in the model dtype (LLaDA2 in float32);
    an empty batch gives an empty output."""
    args = make_moe(5, 32, 16, 8, 2, seed=1, device=device, dtype=torch.float16, weight_dtype=torch.float16)
    assert rel(moe.fused_moe(*args), reference.fused_moe(*args)) < TOLERANCE[torch.float16]
    empty = [a[:0] if i in (0, 3, 4) else a for i, a in enumerate(args)]
    assert moe.fused_moe(*empty).shape == (0, 32)


def test_dispatch_and_float64(device, triton_backend, monkeypatch):
    """ops.fused_moe takes the kernel under the triton backend (float64 stays on the twin)."""
    calls = []
    kernel = moe.fused_moe
    monkeypatch.setattr(moe, "fused_moe", lambda *a: calls.append(a[0].dtype) or kernel(*a))
    args = make_moe(4, 32, 16, 8, 2, seed=2, device=device)
    assert rel(triton_backend.fused_moe(*args), reference.fused_moe(*args)) < TOLERANCE[torch.float32]
    double = [a.double() if a.is_floating_point() else a for a in args]
    torch.testing.assert_close(triton_backend.fused_moe(*double), reference.fused_moe(*double))
    assert calls == [torch.float32]
    int32_ids = (*args[:3], args[3].int(), args[4])  # routers may hand over int32 ids
    assert rel(moe.fused_moe(*int32_ids), reference.fused_moe(*args)) < TOLERANCE[torch.float32]


def test_launcher_names_bad_arguments(device):
    x, w_gate_up, w_down, ids, weights = make_moe(4, 32, 16, 8, 2, device=device)
    with pytest.raises(ValueError, match="w_gate_up"):
        moe.fused_moe(x, w_gate_up[:, :-1], w_down, ids, weights)
    with pytest.raises(ValueError, match="topk_weights"):
        moe.fused_moe(x, w_gate_up, w_down, ids, weights[:, :1])
    with pytest.raises(ValueError, match="w_down must be"):
        moe.fused_moe(x, w_gate_up, w_down.double(), ids, weights)
    with pytest.raises(ValueError, match="topk_ids must hold integers"):
        moe.fused_moe(x, w_gate_up, w_down, ids.float(), weights)
    with pytest.raises(ValueError, match="x dtype"):
        moe.fused_moe(x.double(), w_gate_up.double(), w_down.double(), ids, weights)


@pytest.mark.gpu
@requires_cuda
def test_runs_inside_a_cuda_graph(device):
    """No host sync anywhere (align included): the call captures into a CUDA
    graph, and a replay on new tokens and a new routing gives their output."""
    x, w_gate_up, w_down, ids, weights = make_moe(24, 64, 32, 16, 4, device=device, dtype=torch.bfloat16)
    moe.fused_moe(x, w_gate_up, w_down, ids, weights)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.fused_moe(x, w_gate_up, w_down, ids, weights)
    new = make_moe(24, 64, 32, 16, 4, skew=0.5, seed=9, device=device, dtype=torch.bfloat16)
    x.copy_(new[0]), ids.copy_(new[3]), weights.copy_(new[4])
    graph.replay()
    assert rel(out, reference.fused_moe(x, w_gate_up, w_down, ids, weights)) < TOLERANCE[torch.bfloat16]
