"""One training step of the demo model, float32 against bf16 autocast, on this CPU.

    python benchmarks/bench_train_step.py [--steps 3] [--threads 1] [--json out.json]

What ``tools/train_demo_model.py``'s ``--bf16 auto`` decides from the CPU's
flags (``native_bf16``): a pretraining step (a 16 x 256 batch, LLaDA's
masked-diffusion loss, backward) of the demo model's shape, from random
weights, each way in turn, CPU time per step (``time.process_time``, over
the thread count as the training script's budget counts it). Where bf16 is
emulated (no AVX512-BF16 or AMX) autocast is several times slower.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.models.llada import LLaDAConfig, LLaDAModel  # noqa: E402
from tools.train_demo_model import MODEL, PRETRAIN_BATCH, PRETRAIN_LEN, llada_loss, native_bf16  # noqa: E402


def step_seconds(model: LLaDAModel, bf16: bool, steps: int, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(3, MODEL["vocab_size"], (PRETRAIN_BATCH, PRETRAIN_LEN), generator=gen)
    maskable = torch.ones_like(x, dtype=torch.bool)
    p = torch.rand(PRETRAIN_BATCH, 1, generator=gen).clamp_min(0.05).expand_as(x)
    is_masked = torch.rand(x.shape, generator=gen) < p
    noisy = torch.where(is_masked, model.config.mask_token_id, x)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        c0 = time.process_time()
        loss = llada_loss(model, x, noisy, is_masked, p, maskable, "pretrain", bf16)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append((time.process_time() - c0) / torch.get_num_threads())
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = LLaDAConfig(**MODEL, mask_token_id=2, eos_token_id=1, pad_token_id=1, torch_dtype="float32")
    cfg.validate()
    model = LLaDAModel(cfg)
    model.init_random(seed=0)
    result = {"native_bf16": native_bf16(), "threads": args.threads, "batch": [PRETRAIN_BATCH, PRETRAIN_LEN],
              "seconds": {}}
    for name, bf16 in (("float32", False), ("bf16 autocast", True)):
        result["seconds"][name] = step_seconds(model, bf16, args.steps)
    f32 = statistics.median(result["seconds"]["float32"])
    print(f"native bf16: {result['native_bf16']}; {args.threads} thread(s); a {PRETRAIN_BATCH} x {PRETRAIN_LEN} "
          "pretraining step, CPU s over threads")
    print(f"{'compute':>14} | {'median s':>8} | {'x float32':>9}")
    for name, times in result["seconds"].items():
        med = statistics.median(times)
        print(f"{name:>14} | {med:8.3f} | {med / f32:9.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
