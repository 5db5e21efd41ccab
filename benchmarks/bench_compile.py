"""Does torch.compile pay for the denoising step on this machine?

    python benchmarks/bench_compile.py [--model M] [--batches 1,8] [--json out.json]

Times the model forward of one engine step (a ragged batch of canvases, the
LM head on one block's rows) eager and under ``torch.compile`` (dynamic
shapes, since every step's batch differs), side by side, after warming both
up, and reports the compile time. Both must give the same logits.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.models.loader import load_model  # noqa: E402


def step_inputs(batch: int, canvas: int, block: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = [canvas + 3 * i for i in range(batch)]  # ragged, as in serving
    ids = torch.randint(0, vocab - 8, (sum(lengths),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    rows = torch.cat([torch.arange(s + n - block, s + n) for s, n in zip(cu, lengths)])
    return ids, positions, cu, rows


def timed(fn, args, iters: int) -> float:
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the bundled demo model")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--canvas", type=int, default=64)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from server.__main__ import bundled_model

    model = load_model(Path(args.model or bundled_model()), "float32", "cpu")
    vocab = model.config.embedding_size
    compiled = torch.compile(model.forward, dynamic=True)
    rows = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        compiled(*step_inputs(1, args.canvas, args.block, vocab, 0))
        compile_s = time.perf_counter() - t0
        for batch in [int(b) for b in args.batches.split(",")]:
            inputs = step_inputs(batch, args.canvas, args.block, vocab, batch)
            compiled(*inputs)  # shapes new to the compiled graph: any recompilation happens here
            ref, got = model(*inputs), compiled(*inputs)
            assert torch.allclose(ref, got, rtol=1e-4, atol=1e-4), "compiled forward disagrees"
            eager_s, compiled_s = timed(model, inputs, args.iters), timed(compiled, inputs, args.iters)
            rows.append({"batch": batch, "tokens": inputs[2][-1], "eager_ms": 1e3 * eager_s,
                         "compiled_ms": 1e3 * compiled_s, "speedup": eager_s / compiled_s})
    print(f"first compile {compile_s:.1f}s; {torch.get_num_threads()} threads")
    print(f"{'batch':>5} | {'tokens':>6} | {'eager ms':>8} | {'compiled ms':>11} | speedup")
    for r in rows:
        print(f"{r['batch']:>5} | {r['tokens']:>6} | {r['eager_ms']:>8.2f} | {r['compiled_ms']:>11.2f} | "
              f"{r['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"compile_s": compile_s, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
