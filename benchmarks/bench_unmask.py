"""Fused unmasking (kernels/unmask.py) against the plain torch path at
LLaDA-8B's vocabulary (126464), 32 rows (one block) per sequence at batch
1/8/64, greedy (T = 0) and sampled (T = 1), side by side in one process.

ours:  ``unmask_scores`` (x0, its probability; Gumbel noise drawn in-kernel)
       then ``select_commits`` (2 commits per sequence, written into the
       canvas in place): the two kernels a denoising step runs.
torch: what a torch sampler does: softmax over the logits in float32, argmax
       of the logits (plus ``torch.rand`` Gumbel noise when sampling), gather,
       topk per sequence, scatter into the canvas.

The floor is one read of the logits at memory bandwidth; sampled rows also
pay for Philox (10 rounds per vocab entry), which makes them compute-bound.

    python benchmarks/bench_unmask.py [--quick] [--device cpu] [--json out.json]

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import copy_bandwidth, kernel_bench_args, time_fn  # noqa: E402  (benchmarks/timing.py)

BLOCK_LENGTH = 32
COMMITS_PER_STEP = 2
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}


def device_bandwidth(device: torch.device) -> tuple[str, float]:
    """(device name, bytes/s) from the vendor's sheet, else a measured copy."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    for fragment, bandwidth in PEAK_BANDWIDTH.items():
        if fragment in name:
            return name, bandwidth
    return name, copy_bandwidth(device)


def torch_path(logits, temperature: float, canvas, positions):
    """The unfused step: (batch * BLOCK_LENGTH, vocab) logits -> canvas."""
    probs = torch.softmax(logits.float(), dim=-1)  # (rows, vocab) float32
    scores = logits
    if temperature > 0:
        u = torch.rand(logits.shape, device=logits.device)
        scores = logits.float() / temperature - torch.log(-torch.log(u))
    x0 = scores.argmax(dim=-1)  # (rows,)
    confidence = probs.gather(1, x0[:, None]).view(-1, BLOCK_LENGTH)  # (batch, BLOCK_LENGTH)
    top = confidence.topk(COMMITS_PER_STEP, dim=1).indices  # (batch, COMMITS_PER_STEP)
    rows = (top + torch.arange(top.shape[0], device=top.device)[:, None] * BLOCK_LENGTH).view(-1)
    canvas.view(-1)[positions[rows]] = x0[rows]


def run_case(device, dtype, batch, vocab, temperature, bandwidth, iters):
    from kernels import unmask

    num_rows = batch * BLOCK_LENGTH
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(num_rows, vocab, device=device, generator=gen) * 4).to(dtype)  # (rows, vocab)
    temp = torch.full((num_rows,), temperature, device=device)
    seed = torch.randint(0, 2**62, (num_rows,), device=device, generator=gen)
    row_offset = torch.arange(num_rows, device=device) % BLOCK_LENGTH
    row_seq = torch.arange(num_rows, device=device) // BLOCK_LENGTH
    quota = torch.full((batch,), COMMITS_PER_STEP, device=device)
    canvas = torch.zeros(batch, 4 * BLOCK_LENGTH, dtype=torch.int64, device=device)
    positions = (row_seq * 4 * BLOCK_LENGTH + 3 * BLOCK_LENGTH + row_offset).contiguous()

    def ours():
        out = unmask.unmask_scores(logits, temp, seed, row_offset)
        unmask.select_commits(out["prob"], row_seq, quota, canvas=canvas, positions=positions, x0=out["x0"])

    t_ours = time_fn(ours, device, iters)
    t_scores = time_fn(lambda: unmask.unmask_scores(logits, temp, seed, row_offset), device, iters)
    t_torch = time_fn(lambda: torch_path(logits, temperature, canvas, positions), device, iters)
    floor = logits.numel() * logits.element_size() / bandwidth
    return dict(case="sampled" if temperature > 0 else "greedy", batch=batch, rows=num_rows, vocab=vocab,
                ours_us=t_ours * 1e6, scores_us=t_scores * 1e6, torch_us=t_torch * 1e6,
                speedup=t_torch / t_ours, floor_us=floor * 1e6, floor_frac=floor / t_ours)


def main() -> None:
    args = kernel_bench_args(__doc__)
    device = torch.device(args.device)
    quick = args.quick or device.type == "cpu"
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # set before kernels.unmask imports triton
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab, batches, iters = (1000, (1, 2), 2) if quick else (126464, (1, 8, 64), args.iters)
    name, bandwidth = device_bandwidth(device)
    print(f"device {name}  logits {str(dtype).split('.')[-1]}  vocab {vocab}  floor at {bandwidth / 1e12:.2f} TB/s")
    print(f"{'case':8s} {'batch':>5s} {'rows':>5s} {'ours us':>9s} {'scores us':>9s} {'torch us':>9s} "
          f"{'speedup':>7s} {'floor us':>8s} {'floor':>6s}")
    rows = []
    for temperature in (0.0, 1.0):
        for batch in batches:
            r = run_case(device, dtype, batch, vocab, temperature, bandwidth, iters)
            rows.append(r)
            print(f"{r['case']:8s} {batch:5d} {r['rows']:5d} {r['ours_us']:9.1f} {r['scores_us']:9.1f} "
                  f"{r['torch_us']:9.1f} {r['speedup']:7.2f} {r['floor_us']:8.1f} {r['floor_frac']:6.1%}", flush=True)
    if args.json:
        report = dict(bench="unmask", device=name, bandwidth=bandwidth, dtype=str(dtype), vocab=vocab,
                      block_length=BLOCK_LENGTH, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                      quick=quick, rows=rows)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
