"""Timing helpers shared by the kernel benchmarks: their common flags, the
median time of a call (CUDA events after an L2 flush on GPU) and the
device's copy bandwidth."""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def kernel_bench_args(doc: str) -> argparse.Namespace:
    """The flags every kernel benchmark takes: --device, --quick, --iters, --json."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def time_fn(fn, device: torch.device, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call; on CUDA each call is timed with events after
    flushing L2, so repeated calls do not read their inputs from cache."""
    for _ in range(min(warmup, iters)):
        fn()
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
        for _ in range(iters):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy rate, bytes read plus written per second."""
    src = torch.empty(64 * 2**20 if device.type == "cuda" else 8 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_fn(lambda: dst.copy_(src), device, iters=5)
