"""Host time per engine step: the part of a step a GPU cannot hide.

The model is replaced by a stub that returns logits at once (a slice of a
preallocated tensor), so what is timed is everything else an engine step
does on the host: scheduling, packing the batch, building the cache view,
the sampler's denoising step on those logits, and applying the commits.
Batches of 1, 8 and 64 requests with 320-token canvases (64-token prompt,
256 generated, blocks of 32, one commit per step), per decoding mode,
closed loop (a finished request is replaced at once), no stop tokens.

    python benchmarks/bench_host.py [--batch 1,8,64] [--decoding exact,prefix_cache,dual_cache] \
        [--steps 200] [--rounds 3] [--vocab 320] [--json out.json]

Per mode and batch: the median and 90th percentile of the step's host CPU
time (the engine thread's CPU time, torch on one thread: what the step costs
the host whatever else shares the machine), its split over schedule /
execute / update, and the median wall-clock step (inflated when the
machine is shared); each a median over rounds of per-round medians.
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

from sampler.params import DiffusionParams  # noqa: E402
from server.__main__ import bundled_model  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from server.engine.llm import LLM  # noqa: E402

PROMPT_LEN, GEN_LENGTH, BLOCK_LENGTH = 64, 256, 32


class StubModel(torch.nn.Module):
    """Returns logits for the asked rows at once: no layers run."""

    def __init__(self, real: torch.nn.Module, vocab: int, max_rows: int):
        super().__init__()
        self.config, self.device, self.dtype = real.config, real.device, real.dtype
        g = torch.Generator().manual_seed(0)
        self.logits = torch.randn(max_rows, vocab, generator=g)  # (max_rows, vocab)

    def forward(self, input_ids, positions, cu_seqlens, logits_indices=None, cache=None, logits_cu_seqlens=None):
        return self.logits[: logits_indices.numel()]


def time_steps(engine: LLMEngine, params: DiffusionParams, batch: int, num_steps: int) -> dict[str, list[float]]:
    """Per timed step: CPU seconds of this thread in schedule, execute and
    update, their sum ("step"), and the step's wall-clock seconds ("wall")."""
    ids = itertools.count()
    prompt = [3 + i % 200 for i in range(PROMPT_LEN)]
    running = 0
    times: dict[str, list[float]] = {"schedule": [], "execute": [], "update": [], "step": [], "wall": []}
    sched, runner = engine.scheduler, engine.runner
    for i in range(num_steps + 40):  # the first 40 steps warm up
        while running < batch:
            engine.add_request(f"host-{next(ids)}", prompt, params)
            running += 1
        w0, t0 = time.perf_counter(), time.thread_time()
        out = sched.schedule()
        t1 = time.thread_time()
        result = runner.execute(out)
        t2 = time.thread_time()
        outputs = sched.update(result)
        t3, w3 = time.thread_time(), time.perf_counter()
        running -= sum(o.finished for o in outputs)
        if i >= 40:
            for k, v in (("schedule", t1 - t0), ("execute", t2 - t1), ("update", t3 - t2), ("step", t3 - t0),
                         ("wall", w3 - w0)):
                times[k].append(v)
    while sched.has_unfinished():  # leave the engine empty for the next case
        for r in list(sched.running) + list(sched.waiting):
            sched.abort(r.req_id)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--decoding", default="exact,prefix_cache,dual_cache")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per case and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=320, help="the stub's logits width")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batch.split(",")]
    canvas = PROMPT_LEN + GEN_LENGTH
    llm = LLM(bundled_model(), dtype="float32", device="cpu", max_num_seqs=max(batches),
              max_num_batched_tokens=max(batches) * canvas, kv_cache_tokens=max(batches) * canvas)
    engine = llm.engine
    engine.stop_ids = frozenset()  # every request runs its whole schedule
    engine.runner.model = StubModel(engine.model, args.vocab, max(batches) * BLOCK_LENGTH)
    rows = []
    for rnd in range(args.rounds):  # rounds outermost: cases interleave in time on a shared machine
        for decoding in args.decoding.split(","):
            params = DiffusionParams(gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, decoding=decoding, seed=0)
            for b in batches:
                t = time_steps(engine, params, b, args.steps)
                rows.append({"decoding": decoding, "batch": b, "round": rnd,
                             **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in t.items()},
                             "step_p90_ms": 1e3 * statistics.quantiles(t["step"], n=10)[-1]})
    summary = []
    print(f"{'decoding':>12} | {'batch':>5} | {'step ms':>8} | {'p90 ms':>7} | {'schedule':>8} | {'execute':>8} | "
          f"{'update':>7} | wall ms")
    for decoding in args.decoding.split(","):
        for b in batches:
            mine = [r for r in rows if r["decoding"] == decoding and r["batch"] == b]
            med = {k: statistics.median(r[k] for r in mine)
                   for k in ("step_ms", "step_p90_ms", "schedule_ms", "execute_ms", "update_ms", "wall_ms")}
            summary.append({"decoding": decoding, "batch": b, **med})
            print(f"{decoding:>12} | {b:>5} | {med['step_ms']:>8.3f} | {med['step_p90_ms']:>7.3f} | "
                  f"{med['schedule_ms']:>8.3f} | {med['execute_ms']:>8.3f} | {med['update_ms']:>7.3f} | "
                  f"{med['wall_ms']:.3f}")
    if args.json:
        meta = {"args": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "canvas": canvas, "block_length": BLOCK_LENGTH}
        Path(args.json).write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
