"""gpu_check part (d): decoding speed of the LLaDA-8B-shaped random bf16
checkpoint (see _llada8b.py) through LLMEngine on the GPU: tokens/s at
concurrency 1, 16 and 64 for exact, dual_cache, and dual_cache committing 4
tokens per step, each with graphs off and on (``enforce_eager`` True/False,
--graphs: "on" pads static cache use steps to batch-size buckets and, on
CUDA, replays them as the CUDA graphs the engine captured at start-up, for
the checkpoint's default block length of 32; the "graphed" column counts the
steps replayed, so 0 there means "on" measured padding alone), and each step's time beside its
roofline floor, max(bytes / bandwidth, FLOPs / matrix rate), with both
ceilings measured on the device first (a device-to-device copy, a bf16
matrix product).

Each measurement: a warm-up batch (2 steps, then aborted), then a fresh
batch of `concurrency` requests (64-token prompt, 256-token canvas, blocks
of 32, ignore_eos) timed over its first block: every step of a block in the
cache modes (one fill, then uses: the steady mix), at least 3 steps and
about --seconds in exact mode (all its steps cost the same). The floor
counts, per step: every weight read once (the embedding excepted, it is
only gathered), cached keys/values read and stored ones written; FLOPs of
the linear layers per token through the model, attention over the whole
canvas, and the LM head on the rows that get logits.

Per concurrency it also prints bench_step.py's ratio (issue 20): the
dual_cache use step's median time over the exact step's times its share,
by tokens computed / canvas tokens and by the FLOPs above; 1.0 means a use
step costs exactly what it computes."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import statistics
import time
from pathlib import Path

from _llada8b import default_dir, ensure_checkpoint
from _part import REPO, Record, device_of, run_part

MODES = ("exact", "dual_cache", "dual_cache_k4")


def ceilings(device, small: bool) -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matrix FLOP/s), measured."""
    import sys

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from timing import time_fn

    if small:  # toy sizes on CPU: the numbers only exercise the arithmetic
        n, m = 16 << 20, 256
    else:
        n, m = 1 << 30, 8192
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * n / time_fn(lambda: dst.copy_(src), device, iters=10)
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    rate = 2 * m ** 3 / time_fn(lambda: a @ b, device, iters=10)
    return bandwidth, rate


def step_cost(seqs: list[tuple], cfg, elem: int = 2) -> tuple[float, float]:
    """(FLOPs, bytes) of one step over ``seqs``: (canvas length, block,
    cache action, decoding, rows with logits) per scheduled request."""
    d, layers, vocab, hidden = cfg.d_model, cfg.n_layers, cfg.embedding_size, cfg.mlp_hidden_size
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = d * (d + 2 * kv) + d * d + 2 * d * hidden + hidden * d  # qkv, out, gate+up, down
    flops, kv_bytes = 0.0, 0.0
    for canvas, (b0, b1), action, decoding, rows in seqs:
        dual = decoding == "dual_cache"
        through = (b1 - b0 if dual else canvas - b0) if action == "use" else canvas
        cached = canvas - through if action == "use" else 0
        stored = (canvas - (b1 - b0) if dual else b0) if action == "fill" else 0
        flops += 2 * per_layer * layers * through + 4 * layers * d * through * canvas + 2 * d * vocab * rows
        kv_bytes += layers * 2 * kv * elem * (cached + stored)
    weights = (layers * per_layer + vocab * d) * elem
    return flops, weights + kv_bytes


def make_engine(path: Path, device, graphs: bool | None, max_seqs: int, canvas: int):
    """An engine with graphs on/off where the config has ``enforce_eager``;
    ``graphs=None``: the engine's default."""
    from server.config import ModelConfig
    from server.engine.engine import LLMEngine
    from server.engine.scheduler import SchedulerConfig

    mc = dict(model=str(path), dtype="bfloat16", device=str(device))
    sc = dict(max_num_seqs=max_seqs, max_num_batched_tokens=max_seqs * canvas)
    if graphs is not None:
        for cls, kw in ((ModelConfig, mc), (SchedulerConfig, sc)):
            if "enforce_eager" in {f.name for f in dataclasses.fields(cls)}:
                kw["enforce_eager"] = not graphs
    return LLMEngine(ModelConfig(**mc), SchedulerConfig(**sc))


def measure(engine, mode: str, conc: int, shape: dict, seconds: float, bw: float, rate: float, sync) -> dict:
    import random

    from sampler.params import DiffusionParams

    gen, block, prompt_len = shape["gen"], shape["block"], shape["prompt"]
    per_step = 4 if mode.endswith("k4") else 1
    params = DiffusionParams(gen_length=gen, block_length=block, steps=gen // per_step, seed=0, ignore_eos=True,
                             decoding="exact" if mode == "exact" else "dual_cache")
    rng = random.Random(conc)
    vocab = min(engine.vocab_size, engine.mask_id) - 1

    def batch(tag: str) -> list[str]:
        ids = [f"{tag}-{mode}-{conc}-{i}" for i in range(conc)]
        for rid in ids:
            engine.add_request(rid, [rng.randrange(vocab) for _ in range(prompt_len)], params)
        return ids

    warm = batch("warm")  # compiles, captures, fills the allocator's pools
    for _ in range(2):
        engine.step()
    for rid in warm:
        engine.abort_request(rid)

    seen: list[list[tuple]] = []
    real = engine.runner.execute

    def spy(sched):
        seen.append([(len(s.canvas), s.block, s.cache_action, s.decoding, len(s.rows)) for s in sched.seqs])
        return real(sched)

    engine.runner.execute = spy
    graphs = engine.runner.graphs
    replayed = []
    if graphs is not None:  # counts the captured steps replayed
        real_run = graphs.run
        graphs.run = lambda *a: replayed.append(1) or real_run(*a)
    ids = batch("run")
    steps_per_block = block // per_step
    committed, times = 0, []
    try:
        while len(times) < steps_per_block:
            sync()
            t0 = time.perf_counter()
            engine.step()
            sync()
            times.append(time.perf_counter() - t0)
            committed += engine.last_step.num_committed
            if mode == "exact" and len(times) >= 3 and sum(times) >= seconds:
                break
    finally:
        engine.runner.execute = real
        if graphs is not None:
            del graphs.run
        for rid in ids:
            engine.abort_request(rid)
    floors = []
    for seqs in seen[: len(times)]:
        flops, nbytes = step_cost(seqs, engine.model.config)
        floors.append(max(nbytes / bw, flops / rate))
    step_s = sum(times) / len(times)
    floor_s = statistics.mean(floors) if floors else float("nan")
    kinds = {}  # step kind (whole / fill / use) -> (seconds, FLOPs, tokens computed, canvas tokens) per step
    for seqs, t in zip(seen, times):
        actions = {a for _, _, a, _, _ in seqs}
        kind = "whole" if actions == {None} else actions.pop() if len(actions) == 1 else "mixed"
        tokens = sum(((b1 - b0) if d == "dual_cache" else c - b0) if a == "use" else c for c, (b0, b1), a, d, _ in seqs)
        kinds.setdefault(kind, []).append((t, step_cost(seqs, engine.model.config)[0], tokens,
                                           sum(c for c, *_ in seqs)))
    by_kind = {kind: {"ms": 1e3 * statistics.median(t for t, *_ in v), "flops": statistics.median(f for _, f, _, _ in v),
                      "token_share": statistics.median(n / c for *_, n, c in v)} for kind, v in kinds.items()}
    return {"mode": mode, "concurrency": conc, "steps": len(times), "step_ms": 1e3 * step_s, "by_kind": by_kind,
            "step_ms_median": 1e3 * statistics.median(times), "floor_ms": 1e3 * floor_s,
            "x_floor": step_s / floor_s if floors else None, "tokens_per_s": committed / sum(times),
            "committed": committed, "running": max((len(s) for s in seen), default=0), "graphed": len(replayed)}


def share_line(rec: Record, rows: list[dict], conc: int, label: str) -> None:
    """bench_step.py's ratio on the GPU: the dual_cache use step's time over
    (the exact whole-canvas step's time x the use step's share of it, by
    tokens computed and by FLOPs), at one concurrency."""
    whole = next((r["by_kind"]["whole"] for r in rows if r["mode"] == "exact" and "whole" in r["by_kind"]), None)
    use = next((r["by_kind"]["use"] for r in rows if r["mode"] == "dual_cache" and "use" in r["by_kind"]), None)
    if whole is None or use is None:
        rec.line(f"dual_cache use step vs its share, conc {conc}: not measured (no exact or no use step)")
        return
    flop_share = use["flops"] / whole["flops"]
    x_share, x_flop = use["ms"] / (whole["ms"] * use["token_share"]), use["ms"] / (whole["ms"] * flop_share)
    rec.data.setdefault("shares", []).append({"concurrency": conc, "graphs": label, "use_ms": use["ms"],
                                              "whole_ms": whole["ms"], "token_share": use["token_share"],
                                              "flop_share": flop_share, "x_share": x_share, "x_flop_share": x_flop})
    rec.line(f"dual_cache use step, conc {conc}, graphs {label}: {use['ms']:.2f} ms = {x_share:.2f}x its token share "
             f"({use['token_share']:.3f}), {x_flop:.2f}x its FLOP share ({flop_share:.3f}) of exact's {whole['ms']:.2f} ms")


def body(args, rec: Record) -> None:
    import torch

    device = device_of(args.small)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    root = Path(args.dir) if args.dir else default_dir(args.small)
    shape = dict(gen=32, block=8, prompt=8) if args.small else dict(gen=256, block=32, prompt=64)
    concs = [int(c) for c in (args.concurrency or ("1,4" if args.small else "1,16,64")).split(",")]
    info = ensure_checkpoint(root, args.small, device)
    rec.data["checkpoint"] = info
    bw, rate = ceilings(device, args.small)
    rec.data.update(bandwidth=bw, matrix_rate=rate, shape=shape, rows=[])
    rec.line(f"ceilings measured: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; "
             f"canvas {shape['prompt']}+{shape['gen']}, block {shape['block']}")
    rec.line(f"{'mode':14s} {'conc':>4s} {'graphs':>6s} {'run':>4s} {'steps':>5s} {'step ms':>8s} "
             f"{'floor ms':>8s} {'x floor':>7s} {'tok/s':>8s} {'graphed':>7s}")
    from server.config import ModelConfig
    from server.engine.scheduler import SchedulerConfig

    has = any("enforce_eager" in {f.name for f in dataclasses.fields(c)} for c in (ModelConfig, SchedulerConfig))
    for setting in args.graphs.split(","):
        graphs = {"on": True, "off": False}[setting]
        if graphs and not has:
            rec.line("graphs on: skipped, the engine has no enforce_eager setting (no graph step)")
            continue
        label = setting if has else "n/a"
        with rec.sub(f"graphs_{setting}"):
            with engine_log() as log:
                engine = make_engine(root, device, graphs, max(concs), shape["prompt"] + shape["gen"])
            for message in log:  # the KV pool, the graphs' reserve and what the capture took, side by side
                rec.line(f"graphs {setting}: {message[:160]}")
            rec.data.setdefault("start_log", {})[setting] = log
            captured = engine.runner.graphs
            rec.data.setdefault("captured", {})[setting] = 0 if captured is None else len(captured.graphs)
            if graphs:
                rec.line(f"graphs on: {rec.data['captured'][setting]} CUDA graphs captured"
                         + ("" if cuda else " (none without CUDA: padded buckets, eager)"))
            for mode in MODES:
                for conc in concs:
                    with rec.sub(f"{mode}_{conc}_{setting}"):
                        r = measure(engine, mode, conc, shape, args.seconds, bw, rate, sync)
                        r["graphs"] = label
                        rec.data["rows"].append(r)
                        xf = f"{r['x_floor']:7.2f}" if r["x_floor"] else f"{'-':>7s}"
                        rec.line(f"{mode:14s} {conc:4d} {label:>6s} {r['running']:4d} {r['steps']:5d} "
                                 f"{r['step_ms']:8.2f} {r['floor_ms']:8.3f} {xf} {r['tokens_per_s']:8.1f} "
                                 f"{r['graphed']:7d}")
            for conc in concs:
                with rec.sub(f"share_{conc}_{setting}"):
                    share_line(rec, [r for r in rec.data["rows"] if r["concurrency"] == conc
                                     and r["graphs"] == label], conc, label)
            del engine
        gc.collect()  # the next setting's engine sizes its KV pool from what this one frees
        if cuda:
            torch.cuda.empty_cache()
    graphs_ratio(rec)


@contextlib.contextmanager
def engine_log():
    """The engine's start-up lines on KV sizing and graph capture, as a list."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    loggers = [logging.getLogger(n) for n in ("server.engine.kv_sizing", "server.engine.graphs")]
    handler, levels = Keep(level=logging.INFO), [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def graphs_ratio(rec: Record) -> None:
    """Whether graphs pay: per mode and concurrency measured both ways,
    tokens/s with graphs on over off (the rows' own figures, side by side)."""
    rows = {(r["mode"], r["concurrency"], r["graphs"]): r for r in rec.data["rows"]}
    ratios = [f"{mode} {conc}: {on['tokens_per_s'] / off['tokens_per_s']:.2f}x"
              for (mode, conc, label), on in rows.items() if label == "on"
              for off in [rows.get((mode, conc, "off"))] if off and off["tokens_per_s"]]
    if ratios:
        rec.data["graphs_speedup"] = ratios
        rec.line("tokens/s graphs on / off: " + ", ".join(ratios))


def add_args(ap) -> None:
    ap.add_argument("--dir", default=None, help="the checkpoint (default $LLADA_8B_DIR or /tmp)")
    ap.add_argument("--graphs", default="off,on", help="CUDA graphs settings to run, in order: off,on")
    ap.add_argument("--concurrency", default=None, help="comma-separated (default 1,16,64; --small 1,4)")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per exact-mode measurement")


if __name__ == "__main__":
    run_part("decode", body, add_args)
