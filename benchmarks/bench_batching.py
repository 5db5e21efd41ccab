"""Continuous batching without HTTP: the engine alone, driven closed-loop
(as bench_serving's clients drive the server: a request finishes, the next
one joins at the following step), at several concurrency levels.

    python benchmarks/bench_batching.py [--model PATH] [--concurrency 1,4,16] \
        [--requests 128] [--decoding exact,dual_cache] [--dtype float32] [--json out.json] \
        [--max-num-batched-tokens 8192] [--kv-cache-tokens N] [--gen-length N] [--block-length N] \
        [--steps N] [--budget-rule step,canvas] [--rounds 1] [--ignore-eos]

Per decoding mode and concurrency: output tokens/s, mean step time, mean
batch size, steps per request, and the ratio of each level's tokens/s to
concurrency 1's. Against bench_serving's figures this separates what the
engine's batching gains from what the HTTP side and a client sharing the
same cores cost. Chat prompts and decoding as bench_serving's (the model's
recommended max_tokens/block_length, greedy, unless given).

``--budget-rule`` compares admission rules side by side, alternating
rounds: ``step`` is the scheduler's (the budget bounds what a step
computes); ``canvas`` is the rule it replaced, kept here only, as a
baseline (the sum of running canvases stays within the budget).
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_serving import PROMPTS  # noqa: E402
from sampler.params import DiffusionParams  # noqa: E402
from server.__main__ import bundled_model  # noqa: E402
from server.engine.llm import LLM  # noqa: E402
from server.engine.request import Request  # noqa: E402
from server.engine.scheduler import Scheduler  # noqa: E402
from server.models.loader import recommended_decoding  # noqa: E402


class CanvasBudgetScheduler(Scheduler):
    """The previous admission rule, for comparison: every running request's
    whole canvas fits the budget at once (fills are then never deferred)."""

    def _admits(self, req: Request, use_sum: int, max_extra: int) -> bool:
        used = sum(r.num_tokens for r in self.running)
        return used + req.num_tokens <= self.config.max_num_batched_tokens


def closed_loop(llm: LLM, prompts: list[list[int]], params: DiffusionParams, concurrency: int,
                num_requests: int) -> dict:
    engine = llm.engine
    ids = itertools.count()
    started = done = running = tokens = steps = batch_sum = running_sum = 0
    step_time = 0.0
    t0 = time.perf_counter()
    while done < num_requests:
        while running < concurrency and started < num_requests:
            engine.add_request(f"bench-{next(ids)}", prompts[started % len(prompts)], params)
            started += 1
            running += 1
        s = time.perf_counter()
        outputs = engine.step()
        step_time += time.perf_counter() - s
        steps += 1
        batch_sum += engine.last_step.num_seqs
        running_sum += len(engine.scheduler.running)
        for out in outputs:
            if out.finished:
                if out.finish_reason == "error":
                    raise RuntimeError(f"request {out.req_id} failed: {out.error}")
                running -= 1
                done += 1
                tokens += len(out.token_ids)
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": num_requests, "wall_s": wall,
            "output_tokens_per_s": tokens / wall, "mean_step_ms": 1e3 * step_time / steps,
            "mean_batch": batch_sum / steps, "mean_running": running_sum / steps,
            "steps_per_request": batch_sum / num_requests}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled demo model)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=128, help="requests per level")
    ap.add_argument("--decoding", default="exact,dual_cache")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192, help="the step budget (server default)")
    ap.add_argument("--kv-cache-tokens", type=int, default=None, help="KV slots (default: the server's)")
    ap.add_argument("--gen-length", type=int, default=None, help="default: the model's recommendation")
    ap.add_argument("--block-length", type=int, default=None, help="default: the model's recommendation")
    ap.add_argument("--steps", type=int, default=None, help="default: gen-length")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="every request runs its whole canvas (no early stop at EOS): the batch the budget admits")
    ap.add_argument("--budget-rule", default="step", help="step and/or canvas, comma-separated")
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the budget rules")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or bundled_model()
    llm = LLM(model, dtype=args.dtype, device="cpu", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_tokens=args.kv_cache_tokens)
    engine = llm.engine
    schedulers = {"step": engine.scheduler, "canvas": CanvasBudgetScheduler(engine.scheduler.config)}
    defaults = recommended_decoding(model, gen_length=32, block_length=8)
    gen_length = args.gen_length or defaults["gen_length"]
    block_length = args.block_length or defaults["block_length"]
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    levels = [int(c) for c in args.concurrency.split(",")]
    rules = args.budget_rule.split(",")
    rows = []
    for decoding in args.decoding.split(","):
        params = DiffusionParams(gen_length=gen_length, block_length=block_length, steps=args.steps,
                                 decoding=decoding, ignore_eos=args.ignore_eos)
        closed_loop(llm, prompts, params, max(levels), min(max(levels), 8))  # warm-up
        for rnd in range(args.rounds):
            for rule in rules:
                engine.scheduler = schedulers[rule]
                for c in levels:
                    rows.append({"decoding": decoding, "rule": rule, "round": rnd,
                                 **closed_loop(llm, prompts, params, c, args.requests)})
                    print(json.dumps(rows[-1]), flush=True)  # progress, in case the run is cut short
    base = {(r["decoding"], r["rule"], r["round"]): r["output_tokens_per_s"] for r in rows
            if r["concurrency"] == levels[0]}
    print(f"{'decoding':>10} | {'rule':>6} | rnd | {'conc':>4} | {'out tok/s':>9} | {'vs conc ' + str(levels[0]):>9} | "
          f"{'step ms':>7} | {'batch':>5} | {'running':>7} | steps/req")
    for r in rows:
        r["ratio"] = r["output_tokens_per_s"] / base[(r["decoding"], r["rule"], r["round"])]
        print(f"{r['decoding']:>10} | {r['rule']:>6} | {r['round']:>3} | {r['concurrency']:>4} | "
              f"{r['output_tokens_per_s']:>9.1f} | {r['ratio']:>8.2f}x | {r['mean_step_ms']:>7.2f} | "
              f"{r['mean_batch']:>5.1f} | {r['mean_running']:>7.1f} | {r['steps_per_request']:.1f}")
    if len(rules) > 1:
        print("\nmedian over rounds, per decoding and concurrency: tok/s by rule, and step/canvas")
        for decoding in args.decoding.split(","):
            for c in levels:
                med = {rule: statistics.median(r["output_tokens_per_s"] for r in rows if r["decoding"] == decoding
                                               and r["rule"] == rule and r["concurrency"] == c) for rule in rules}
                ratio = f" | step/canvas {med['step'] / med['canvas']:.2f}x" if {"step", "canvas"} <= set(med) else ""
                print(f"{decoding:>10} | conc {c:>3} | " + " | ".join(f"{k} {v:.1f}" for k, v in med.items()) + ratio)
    if args.json:
        meta = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(), "gen_length": gen_length,
                "block_length": block_length}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
