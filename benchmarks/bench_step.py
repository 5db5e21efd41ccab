"""What one engine step costs per decoding mode, against what it computes.

    python benchmarks/bench_step.py [--batch 1,16] [--modes exact,prefix_cache,dual_cache] [--blocks 2] \
        [--rounds 2] [--breakdown] [--json out.json]

The demo model (float32, one thread) on a canvas-filling workload: prompts of
18-22 tokens, 256 generated positions in blocks of 32, one commit per step,
``ignore_eos`` so no answer stops early and every step computes what a full
canvas asks. Per batch size (all requests admitted together, so they fill
and use their caches in the same steps) and mode, the first ``--blocks``
blocks' steps are timed (exact mode: a dozen steps, they all cost the same)
and sorted by kind: ``whole`` (exact: the whole canvas), ``fill`` (a cache
mode's block start: the whole canvas, storing keys/values) and ``use`` (block
+ suffix, or the block alone, over the stored keys).

Columns, per mode x batch x kind: the median step time (``runner.execute``:
packing, model, sampler, the lists handed back; the thread's CPU time, torch
on one thread, so what shares the machine does not count), the mean (a
block's first use step also gathers the cached keys the later ones reuse:
the mean carries that once-per-block cost, the median does not) and the
model forward's median alone; tokens computed per
request; ``share`` = tokens computed / canvas tokens (the issue's FLOP share)
and ``x share`` = step time / (whole-canvas step time at the same batch x
share), per step, then the median: 1.0 means the step costs exactly its
share. ``flop sh`` and ``x flop`` do the same with the FLOPs counted
(``step_flops``: the LM head and the last layer's cut to the rows with
logits are the same in every mode, so on a model with a large vocabulary
against its width, as the demo's, the token share understates what a use
step must compute). ``ms/req`` compares batch sizes per request. Rounds
are outermost so cases interleave in time on a shared machine; medians are
over all rounds' steps.

``--breakdown`` adds one more round with timers around the step's parts and
prints, per case, the median thread time of each part, exclusive of the
parts inside it: the GEMMs (``F.linear``: projections, MLP, LM head), the
attention op, the RMSNorms, the sampler (``StepRows.build`` and
``denoise_step``) and the rest (rotary, activations, residual adds,
embedding, packing, the lists handed back, Python). The timers cost a few
microseconds per call, so these figures are not the table's.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sampler.params import DiffusionParams  # noqa: E402
from server.__main__ import bundled_model  # noqa: E402
from server.engine.llm import LLM  # noqa: E402
from server.engine import runner as runner_module  # noqa: E402
from server.engine.runner import plan  # noqa: E402
from server.models.layers import RMSNorm  # noqa: E402
from kernels import ops  # noqa: E402

GEN_LENGTH, BLOCK_LENGTH = 256, 32
PROMPT_LENGTHS = (18, 19, 20, 21, 22)
EXACT_STEPS = 12


def step_flops(model: torch.nn.Module, seqs: list, plans: list) -> float:
    """The FLOPs a step computes: per layer the q/k/v projection on every
    token put through the model, the output projection and MLP on every
    token but in the last layer only on the rows that get logits (the
    engine's cut), attention of those queries over the keys they see, and
    the LM head on the rows."""
    cfg = model.config
    layers = list(model.layers)
    qkv = sum(p.numel() for n, p in layers[0].named_parameters() if n.endswith("qkv_proj.weight"))
    rest = sum(p.numel() for p in layers[0].parameters() if p.ndim == 2) - qkv
    width = cfg.n_heads * cfg.head_dim
    flops = 0.0
    for s, p in zip(seqs, plans):
        n, rows, keys = p.end - p.start, len(s.rows), p.cached + p.end - p.start
        queries = (len(layers) - 1) * n + rows
        flops += 2 * len(layers) * qkv * n + 2 * rest * queries
        flops += 4 * width * keys * queries + 2 * cfg.d_model * cfg.embedding_size * rows
    return flops


class Breakdown:
    """Thread time per part of a step, each part's exclusive of the parts
    called inside it, while installed (a context manager)."""

    PARTS = ("linear", "attention", "norms", "sampler", "other")

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open part: the time of parts inside it so far
        self._installed: list[tuple[object, str, object]] = []

    def _wrap(self, owner: object, name: str, part: str) -> None:
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            self._inner.append(0.0)
            t0 = time.thread_time()
            try:
                return real(*args, **kwargs)
            finally:
                elapsed = time.thread_time() - t0
                self.seconds[part] = self.seconds.get(part, 0.0) + elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed

        self._installed.append((owner, name, real))
        setattr(owner, name, timed)

    def __enter__(self) -> "Breakdown":
        self._wrap(torch.nn.functional, "linear", "linear")
        self._wrap(ops, "varlen_attention", "attention")
        self._wrap(RMSNorm, "forward", "norms")
        self._wrap(runner_module, "denoise_step", "sampler")
        self._wrap(runner_module.StepRows, "build", "sampler")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self._installed):
            setattr(owner, name, real)

    def take(self, step_seconds: float) -> dict[str, float]:
        """This step's parts (and resets): what the timers did not see is "other"."""
        parts = {p: self.seconds.get(p, 0.0) for p in self.PARTS[:-1]}
        parts["other"] = step_seconds - sum(parts.values())
        self.seconds = {}
        return parts


def time_mode(llm: LLM, mode: str, batch: int, num_blocks: int, tag: str,
              breakdown: Breakdown | None = None) -> list[dict]:
    """Steps of ``batch`` fresh requests: per step its kind, the CPU seconds
    of runner.execute and of the model forward (this thread's: torch runs on
    it alone, so other work on a shared machine does not count), the wall
    seconds of runner.execute, tokens and FLOPs computed, canvas tokens."""
    engine = llm.engine
    runner, model = engine.runner, engine.model
    params = DiffusionParams(gen_length=GEN_LENGTH, steps=GEN_LENGTH, block_length=BLOCK_LENGTH, decoding=mode,
                             seed=0, ignore_eos=True)
    rng = random.Random(batch)
    vocab = [t for t in range(3, engine.vocab_size) if t != engine.mask_id]
    ids = [f"{tag}-{mode}-{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        prompt = [rng.choice(vocab) for _ in range(PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)])]
        engine.add_request(rid, prompt, params)
    steps: list[dict] = []
    forward_s: list[float] = []
    real_execute, real_forward = runner.execute, model.forward

    def forward(*args, **kwargs):
        t0 = time.thread_time()
        out = real_forward(*args, **kwargs)
        forward_s.append(time.thread_time() - t0)
        return out

    def execute(sched):
        actions = {s.cache_action for s in sched.seqs}
        kind = "whole" if actions == {None} else actions.pop() if len(actions) == 1 else "mixed"
        plans = [plan(s) for s in sched.seqs]
        t0, w0 = time.thread_time(), time.perf_counter()
        out = real_execute(sched)
        seconds = time.thread_time() - t0
        if breakdown is not None:
            steps.append({"kind": kind, "seconds": seconds, "parts": breakdown.take(seconds)})
            return out
        steps.append({"kind": kind, "seconds": seconds, "wall_seconds": time.perf_counter() - w0,
                      "forward_seconds": forward_s[-1],
                      "num_seqs": len(sched.seqs), "flops": step_flops(model, sched.seqs, plans),
                      "tokens": sum(p.end - p.start for p in plans),
                      "canvas_tokens": sum(len(s.canvas) for s in sched.seqs)})
        return out

    runner.execute, model.forward = execute, forward
    limit = EXACT_STEPS if mode == "exact" else num_blocks * BLOCK_LENGTH
    try:
        while len(steps) < limit and engine.has_unfinished():
            engine.step()
    finally:
        runner.execute, model.forward = real_execute, real_forward
        for rid in ids:
            engine.abort_request(rid)
    return steps


def summarize(steps: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(s["mode"], s["batch"], s["kind"]) for s in steps},
                  key=lambda k: (k[1], ("exact", "prefix_cache", "dual_cache").index(k[0]), k[2]))
    for mode, batch, kind in keys:
        mine = [s for s in steps if (s["mode"], s["batch"], s["kind"]) == (mode, batch, kind)]

        def median(f) -> float:
            return statistics.median(f(s) for s in mine)

        ms = median(lambda s: 1e3 * s["seconds"])
        rows.append({
            "mode": mode, "batch": batch, "kind": kind, "steps": len(mine), "step_ms": ms,
            "mean_step_ms": 1e3 * statistics.mean(s["seconds"] for s in mine),
            "forward_ms": median(lambda s: 1e3 * s["forward_seconds"]), "ms_per_request": ms / batch,
            "tokens_per_request": median(lambda s: s["tokens"] / s["num_seqs"]),
            "share": median(lambda s: s["tokens"] / s["canvas_tokens"]),
            "flop_share": median(lambda s: s["flops"] / s["whole_flops"]),
            "x_share": median(lambda s: s["seconds"] / (s["whole_s"] * s["tokens"] / s["canvas_tokens"])),
            "x_flop_share": median(lambda s: s["seconds"] / (s["whole_s"] * s["flops"] / s["whole_flops"])),
            "forward_x_flop_share": median(
                lambda s: s["forward_seconds"] / (s["whole_forward_s"] * s["flops"] / s["whole_flops"]))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--modes", default="exact,prefix_cache,dual_cache")
    ap.add_argument("--blocks", type=int, default=2, help="blocks timed per cache-mode case")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default=None, help="default: the bundled demo model")
    ap.add_argument("--breakdown", action="store_true", help="one more round: thread time per part of a step")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batch.split(",")]
    modes = args.modes.split(",")
    if "exact" not in modes:
        ap.error("--modes needs exact: it is the whole-canvas step the others are measured against")
    canvas = max(PROMPT_LENGTHS) + GEN_LENGTH
    llm = LLM(args.model or bundled_model(), dtype="float32", device="cpu", max_num_seqs=max(batches),
              max_num_batched_tokens=max(batches) * canvas, kv_cache_tokens=max(batches) * canvas)
    for mode in modes:  # warm-up: first calls allocate and build tables
        time_mode(llm, mode, 1, 1, "warm")
    steps = []
    for rnd in range(args.rounds):
        for batch in batches:
            by_mode = {mode: time_mode(llm, mode, batch, args.blocks, f"r{rnd}") for mode in modes}
            whole = {k: statistics.median(s[k] for s in by_mode["exact"])
                     for k in ("seconds", "forward_seconds", "flops")}
            for mode, mine in by_mode.items():
                for s in mine:
                    steps.append({**s, "mode": mode, "batch": batch, "round": rnd, "whole_s": whole["seconds"],
                                  "whole_forward_s": whole["forward_seconds"], "whole_flops": whole["flops"]})
    rows = summarize(steps)
    print(f"float32, {torch.get_num_threads()} thread; canvas ~{canvas} (gen {GEN_LENGTH}, block {BLOCK_LENGTH}); "
          f"x share = step / (whole-canvas step x tokens computed / canvas); x flop = step / (whole-canvas step x "
          f"FLOPs / its FLOPs)")
    print(f"{'mode':>12} | {'batch':>5} | {'kind':>5} | {'steps':>5} | {'step ms':>8} | {'mean ms':>8} | "
          f"{'ms/req':>7} | {'fwd ms':>7} | {'tok/req':>7} | {'share':>5} | {'x share':>7} | {'flop sh':>7} | {'x flop':>6} | "
          f"{'fwd x flop':>10}")
    for r in rows:
        print(f"{r['mode']:>12} | {r['batch']:>5} | {r['kind']:>5} | {r['steps']:>5} | {r['step_ms']:>8.2f} | "
              f"{r['mean_step_ms']:>8.2f} | "
              f"{r['ms_per_request']:>7.2f} | {r['forward_ms']:>7.2f} | {r['tokens_per_request']:>7.0f} | "
              f"{r['share']:>5.3f} | {r['x_share']:>7.2f} | {r['flop_share']:>7.3f} | {r['x_flop_share']:>6.2f} | "
              f"{r['forward_x_flop_share']:>10.2f}")
    parts_rows = []
    if args.breakdown:
        with Breakdown() as breakdown:
            for batch in batches:
                for mode in modes:
                    by_kind: dict[str, list[dict]] = {}
                    for s in time_mode(llm, mode, batch, args.blocks, "parts", breakdown):
                        by_kind.setdefault(s["kind"], []).append(s)
                    for kind, mine in by_kind.items():
                        parts_rows.append({"mode": mode, "batch": batch, "kind": kind,
                                           "step_ms": 1e3 * statistics.median(s["seconds"] for s in mine),
                                           **{p: 1e3 * statistics.median(s["parts"][p] for s in mine)
                                              for p in Breakdown.PARTS}})
        print("\nwhere the time goes (median thread ms per part, exclusive; timers on):")
        print(f"{'mode':>12} | {'batch':>5} | {'kind':>5} | {'step ms':>8} | "
              + " | ".join(f"{p:>9}" for p in Breakdown.PARTS))
        for r in parts_rows:
            print(f"{r['mode']:>12} | {r['batch']:>5} | {r['kind']:>5} | {r['step_ms']:>8.2f} | "
                  + " | ".join(f"{r[p]:>9.2f}" for p in Breakdown.PARTS))
    if args.json:
        meta = {"args": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "gen_length": GEN_LENGTH, "block_length": BLOCK_LENGTH, "prompt_lengths": PROMPT_LENGTHS}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows, "steps": steps, "breakdown": parts_rows},
                                              indent=2))


if __name__ == "__main__":
    main()
