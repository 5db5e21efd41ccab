"""Fused ragged attention (kernels/attention.py) against torch SDPA at
LLaDA-8B shapes (32 heads, head_dim 128), side by side in one process:

- blocks: a 32-token block per sequence over 512/1024/4096 cached keys held
  in 64-token pages (prefix-cache decoding), batch 1/16/64;
- canvas: the whole canvas of 512/1024 tokens (exact decoding), batch 1/8.

Baselines: SDPA (flash backend on CUDA) called once per sequence, as a ragged
batch needs, on keys already gathered contiguously (the gather is not
timed), and SDPA on the padded-free dense batch (every sequence here has the
same length: the best case for SDPA). Each time is also given as a fraction
of its floor: max(bytes that must move / memory bandwidth, FLOPs / matrix
rate).

    python benchmarks/bench_attention.py [--quick] [--device cpu] [--json out.json]

--quick / --device cpu run tiny shapes (on CPU under the Triton interpreter):
a smoke test, not a measurement.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import copy_bandwidth, kernel_bench_args, time_fn  # noqa: E402  (benchmarks/timing.py)

PAGE_SIZE = 64
PEAKS = {  # name fragment -> (memory bytes/s, dense bf16 FLOP/s), from the vendors' sheets
    "H200": (4.8e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100": (3.35e12, 989e12),
    "A100": (2.0e12, 312e12),
    "L40S": (0.864e12, 362e12),
}


def device_peaks(device: torch.device) -> tuple[str, float, float]:
    """(device name, bytes/s, FLOP/s); unknown devices get a measured copy
    bandwidth and a nominal 100 TFLOP/s."""
    if device.type != "cuda":
        return platform.processor() or "cpu", copy_bandwidth(device), 1e12
    name = torch.cuda.get_device_name(device)
    for fragment, (bandwidth, flops) in PEAKS.items():
        if fragment in name:
            return name, bandwidth, flops
    return name, copy_bandwidth(device), 100e12


def make_case(device, dtype, batch, q_len, cache_len, heads, head_dim):
    """Packed queries and current keys, a paged cache of cache_len keys per
    sequence (pages shuffled), and the same keys gathered per sequence for
    SDPA as (batch, heads, keys, head_dim)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch * q_len, heads, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(batch * q_len, heads, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(batch * q_len, heads, head_dim, device=device, dtype=dtype, generator=gen)
    cu = [i * q_len for i in range(batch + 1)]
    cache = {}
    k_all = k.view(batch, q_len, heads, head_dim)
    v_all = v.view(batch, q_len, heads, head_dim)
    if cache_len:
        pages_per_seq = -(-cache_len // PAGE_SIZE)
        num_pages = batch * pages_per_seq
        k_cache = torch.randn(num_pages, PAGE_SIZE, heads, head_dim, device=device, dtype=dtype, generator=gen)
        v_cache = torch.randn_like(k_cache)
        order = torch.randperm(num_pages, device=device, generator=gen)
        block_table = order.view(batch, pages_per_seq).to(torch.int32)
        cache = dict(k_cache=k_cache, v_cache=v_cache, block_table=block_table, cache_seqlens=[cache_len] * batch)
        pages = block_table.long()
        k_prefix = k_cache[pages].flatten(1, 2)[:, :cache_len]  # (batch, cache_len, heads, head_dim)
        v_prefix = v_cache[pages].flatten(1, 2)[:, :cache_len]
        k_all = torch.cat([k_prefix, k_all], 1)
        v_all = torch.cat([v_prefix, v_all], 1)
    dense = tuple(t.transpose(1, 2).contiguous() for t in (q.view(batch, q_len, heads, head_dim), k_all, v_all))
    return (q, k, v, cu, cu), cache, dense


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def run_case(name, device, dtype, batch, q_len, cache_len, heads, head_dim, peaks, iters):
    from kernels import attention

    args, cache, (qd, kd, vd) = make_case(device, dtype, batch, q_len, cache_len, heads, head_dim)
    ours = lambda: attention.varlen_attention(*args, **cache)  # noqa: E731
    loop = lambda: [sdpa(qd[i:i + 1], kd[i:i + 1], vd[i:i + 1]) for i in range(batch)]  # noqa: E731
    batched = lambda: sdpa(qd, kd, vd)  # noqa: E731
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_loop, t_batched = time_fn(loop, device, iters), time_fn(batched, device, iters)
            want = batched()
    else:
        t_loop, t_batched = time_fn(loop, device, iters), time_fn(batched, device, iters)
        want = batched()
    t_ours = time_fn(ours, device, iters)
    err = (ours().view(batch, q_len, heads, head_dim).transpose(1, 2).float() - want.float()).abs().max().item()
    num_keys = cache_len + q_len
    elem = torch.finfo(dtype).bits // 8
    bytes_moved = elem * heads * head_dim * batch * (2 * q_len + 2 * num_keys)  # q, out, k, v
    flops = 4 * batch * heads * head_dim * q_len * num_keys
    _, bandwidth, matrix_rate = peaks
    floor = max(bytes_moved / bandwidth, flops / matrix_rate)
    return dict(case=name, batch=batch, q_len=q_len, cache_len=cache_len, ours_us=t_ours * 1e6,
                sdpa_loop_us=t_loop * 1e6, sdpa_batched_us=t_batched * 1e6,
                speedup_vs_loop=t_loop / t_ours, speedup_vs_batched=t_batched / t_ours,
                floor_us=floor * 1e6, floor_frac=floor / t_ours, max_abs_err=err)


def main() -> None:
    args = kernel_bench_args(__doc__)
    device = torch.device(args.device)
    quick = args.quick or device.type == "cpu"
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # set before kernels.attention imports triton
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quick:
        heads, head_dim, iters = 4, 32, 2
        cases = [("block", b, 8, n) for n in (32, 64) for b in (1, 2)] + [("canvas", 2, 24, 0)]
    else:
        heads, head_dim, iters = 32, 128, args.iters
        cases = [("block", b, 32, n) for n in (512, 1024, 4096) for b in (1, 16, 64)]
        cases += [("canvas", b, n, 0) for n in (512, 1024) for b in (1, 8)]
    peaks = device_peaks(device)
    rows = []
    print(f"device {peaks[0]}  dtype {str(dtype).split('.')[-1]}  heads {heads}  head_dim {head_dim}  "
          f"floor at {peaks[1] / 1e12:.2f} TB/s, {peaks[2] / 1e12:.0f} TFLOP/s")
    print(f"{'case':7s} {'batch':>5s} {'q':>5s} {'cached':>6s} {'ours us':>9s} {'loop us':>9s} "
          f"{'dense us':>9s} {'x loop':>7s} {'x dense':>7s} {'floor':>6s} {'err':>8s}")
    for name, batch, q_len, cache_len in cases:
        r = run_case(name, device, dtype, batch, q_len, cache_len, heads, head_dim, peaks, iters)
        rows.append(r)
        print(f"{name:7s} {batch:5d} {q_len:5d} {cache_len:6d} {r['ours_us']:9.1f} {r['sdpa_loop_us']:9.1f} "
              f"{r['sdpa_batched_us']:9.1f} {r['speedup_vs_loop']:7.2f} {r['speedup_vs_batched']:7.2f} "
              f"{r['floor_frac']:6.1%} {r['max_abs_err']:8.1e}", flush=True)
    if args.json:
        report = dict(bench="attention", device=peaks[0], bandwidth=peaks[1], matrix_rate=peaks[2],
                      dtype=str(dtype), heads=heads, head_dim=head_dim, page_size=PAGE_SIZE,
                      torch=torch.__version__, date=time.strftime("%Y-%m-%d"), quick=quick, rows=rows)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
