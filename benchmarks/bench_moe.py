"""The routed experts of one MoE layer three ways, side by side in one
process: the fused Triton kernel (kernels/moe.py, CUDA only), its torch
twin (kernels/reference.py: pairs sorted by expert, one GEMM pair per expert
that got any) and a plain loop over every expert (what the Hugging Face
modeling code does: find the expert's tokens, run it, add its weighted
output back).

Shapes on CUDA: LLaDA2.0-mini's (hidden 2048, 256 experts, top-8,
moe_intermediate_size 512, bfloat16) at 32 / 256 / 1024 / 4096 tokens (a
block of one request up to whole canvases of a batch), routing uniform
over the experts (a trained router's load balancing) and, at 256 tokens,
skewed (a few hot experts, many idle). Each row also gives the kernel's
time as a fraction of its floor: max(bytes of the experts that got a token /
memory bandwidth, 2 x pairs x 3 x hidden x intermediate FLOPs / peak).

On CPU (small shapes, float32): the twin against the loop only; the Triton
interpreter is no speed figure.

    python benchmarks/bench_moe.py [--device cpu] [--quick] [--iters N] [--json out.json]
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_attention import device_peaks  # noqa: E402  (benchmarks/bench_attention.py)
from timing import kernel_bench_args, time_fn  # noqa: E402  (benchmarks/timing.py)

# LLaDA2.0-mini's MoE layers (config.json on the hub; LLaDA2.1-mini has the same).
MINI = dict(hidden=2048, inter=512, num_experts=256, top_k=8)
CPU_SHAPE = dict(hidden=512, inter=128, num_experts=64, top_k=8)
QUICK_SHAPE = dict(hidden=64, inter=32, num_experts=16, top_k=4)


def loop_over_experts(x, w_gate_up, w_down, topk_ids, topk_weights) -> torch.Tensor:
    """Every expert in turn: its (token, k) pairs found by comparison, its
    SwiGLU on those tokens, the weighted rows added into the output."""
    inter = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=topk_weights.dtype, device=x.device)
    for e in range(w_gate_up.shape[0]):
        token, k = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        gate_up = x[token] @ w_gate_up[e].t()
        y = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w_down[e].t()
        out.index_add_(0, token, y.to(out.dtype) * topk_weights[token, k, None])
    return out.to(x.dtype)


def make_experts(device, dtype, hidden, inter, num_experts, top_k, seed=0):
    """Random expert weights (made on the device: LLaDA2.0-mini's are 1.6 GB a layer)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device) / hidden ** 0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=gen, device=device) / inter ** 0.5
    return w_gate_up.to(dtype), w_down.to(dtype)


def make_tokens(device, dtype, num_tokens, hidden, num_experts, top_k, skew=0.0, seed=1):
    """Hidden states and a routing of distinct experts per token; skew > 0
    draws expert e with probability ~ exp(-skew * e) (a few hot experts)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(device, dtype)
    prob = torch.exp(-skew * torch.arange(num_experts, dtype=torch.float64)).expand(num_tokens, -1)
    topk_ids = torch.multinomial(prob, top_k, replacement=False, generator=gen).to(device)
    topk_weights = torch.rand(num_tokens, top_k, generator=gen).to(device)  # float32, as LLaDA2 routes
    return x, topk_ids, topk_weights


def side_by_side(fns: dict, device: torch.device, iters: int) -> dict[str, float]:
    """Median seconds per call of each function. On CPU the calls take turns
    within each round, so a shared machine's load swings hit all of them
    alike; on CUDA each is timed on its own (events, L2 flushed)."""
    if device.type == "cuda":
        return {name: time_fn(fn, device, iters) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters + 1):  # the first round warms up
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def run_case(device, dtype, experts, num_tokens, shape, skew, peaks, iters, with_kernel):
    from kernels import reference

    x, topk_ids, topk_weights = make_tokens(device, dtype, num_tokens, shape["hidden"], shape["num_experts"],
                                            shape["top_k"], skew)
    args = (x, *experts, topk_ids, topk_weights)
    hidden, inter, top_k = shape["hidden"], shape["inter"], shape["top_k"]
    twin_out = reference.fused_moe(*args)
    loop_out = loop_over_experts(*args)
    fns = {"twin": lambda: reference.fused_moe(*args), "loop": lambda: loop_over_experts(*args)}
    if with_kernel:
        from kernels import moe

        fns["kernel"] = lambda: moe.fused_moe(*args)
    times = side_by_side(fns, device, iters)
    row = dict(tokens=num_tokens, routing="skewed" if skew else "uniform", **shape,
               experts_used=int(args[3].unique().numel()), twin_us=times["twin"] * 1e6,
               loop_us=times["loop"] * 1e6, loop_vs_twin_rel=_rel(loop_out, twin_out))
    row["twin_speedup_vs_loop"] = row["loop_us"] / row["twin_us"]
    if with_kernel:
        row["kernel_vs_twin_rel"] = _rel(moe.fused_moe(*args), twin_out)
        row["kernel_us"] = times["kernel"] * 1e6
        row["kernel_speedup_vs_twin"] = row["twin_us"] / row["kernel_us"]
        row["kernel_speedup_vs_loop"] = row["loop_us"] / row["kernel_us"]
        _, bandwidth, flops = peaks
        weight_bytes = row["experts_used"] * 3 * hidden * inter * args[1].element_size()
        floor = max(weight_bytes / bandwidth, 2 * num_tokens * top_k * 3 * hidden * inter / flops)
        row["floor_us"], row["floor_frac"] = floor * 1e6, floor * 1e6 / row["kernel_us"]
    return row


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    args = kernel_bench_args(__doc__)
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    if args.quick:
        shape, cases, iters = QUICK_SHAPE, [(8, 0.0), (64, 0.0)], 2
    elif is_cuda:
        shape, iters = MINI, args.iters
        cases = [(32, 0.0), (256, 0.0), (256, 0.3), (1024, 0.0), (4096, 0.0)]
    else:
        shape, iters = CPU_SHAPE, min(args.iters, 7)
        cases = [(32, 0.0), (256, 0.0), (256, 0.3), (1024, 0.0)]
    dtype = torch.bfloat16 if is_cuda else torch.float32
    if not is_cuda:
        torch.set_num_threads(1)  # one core of a shared machine: steadier than contending threads
    peaks = device_peaks(device)
    print(f"device {peaks[0]}  {str(dtype).split('.')[-1]}  hidden {shape['hidden']} experts {shape['num_experts']} "
          f"top-{shape['top_k']} intermediate {shape['inter']}" + ("" if is_cuda else "  (twin vs loop only)"))
    head = f"{'tokens':>6s} {'routing':8s} {'used':>4s} {'loop us':>9s} {'twin us':>9s} {'twin x loop':>11s}"
    print(head + (f" {'kernel us':>9s} {'x twin':>7s} {'x loop':>7s} {'floor':>6s} {'rel err':>8s}" if is_cuda else ""))
    experts = make_experts(device, dtype, **shape)
    rows = []
    for num_tokens, skew in cases:
        r = run_case(device, dtype, experts, num_tokens, shape, skew, peaks, iters, with_kernel=is_cuda)
        rows.append(r)
        line = (f"{num_tokens:6d} {r['routing']:8s} {r['experts_used']:4d} {r['loop_us']:9.1f} {r['twin_us']:9.1f} "
                f"{r['twin_speedup_vs_loop']:11.2f}")
        if is_cuda:
            line += (f" {r['kernel_us']:9.1f} {r['kernel_speedup_vs_twin']:7.2f} {r['kernel_speedup_vs_loop']:7.2f} "
                     f"{r['floor_frac']:6.1%} {r['kernel_vs_twin_rel']:8.1e}")
        print(line, flush=True)
    if args.json:
        report = dict(bench="moe", device=peaks[0], dtype=str(dtype), torch=torch.__version__,
                      threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"), quick=args.quick, rows=rows)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
