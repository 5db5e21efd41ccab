"""Step time at tensor parallel sizes 1 and 2, side by side in one run, and
the share of each TP step spent in collectives (all-reduces of the layers,
the embedding, and the sampler's small all-gathers).

A step here is what the engine's runner does for an exact step of a
batch: one forward over the packed canvases (the LM head on each sequence's
current block only) and the denoising step over those rows. The model is a
random dense LLaDA checkpoint, written once to a temporary folder, large
enough that splitting its GEMMs pays (default: d_model 1024, 16 heads, 4
layers, MLP 4096, vocabulary 32000: ~100M parameters). Each rank is a
process (gloo on CPU, NCCL on CUDA) with one intra-op thread on CPU; TP=1 is
also timed with as many threads as TP=2 has processes, the fair comparison
on a CPU (two cores either way).

    python benchmarks/bench_tp.py [--device cpu|cuda] [--quick] [--iters N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {"full": dict(d_model=1024, n_heads=16, n_kv_heads=16, n_layers=4, mlp_hidden_size=4096, vocab_size=32000),
         "quick": dict(d_model=256, n_heads=8, n_kv_heads=8, n_layers=2, mlp_hidden_size=704, vocab_size=4000)}
BATCH = {"full": (4, 128, 32), "quick": (2, 64, 16)}  # sequences, canvas length, rows per sequence (a block)


def write_checkpoint(out: Path, size: str) -> Path:
    from server.models.llada import LLaDAConfig, LLaDAModel
    from server.models.writer import save_checkpoint

    fields = SIZES[size] | dict(rope_theta=10000.0, max_sequence_length=4096, mask_token_id=SIZES[size]["vocab_size"] - 1,
                                eos_token_id=SIZES[size]["vocab_size"] - 2)
    config = LLaDAConfig(**fields)
    config.validate()
    model = LLaDAModel(config)
    model.init_random(seed=0)
    save_checkpoint(model, out)
    return out


def _step_inputs(size: str, device: torch.device):
    from sampler.block_diffusion import StepRows

    num_seqs, length, num_rows = BATCH[size]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SIZES[size]["vocab_size"] - 2, (num_seqs * length,), generator=g).to(device)
    positions = torch.arange(length).repeat(num_seqs).to(device)
    cu = [i * length for i in range(num_seqs + 1)]
    rows = torch.cat([torch.arange(s * length + length - num_rows, (s + 1) * length) for s in range(num_seqs)])
    step_rows = StepRows.build(row_offsets=[list(range(num_rows))] * num_seqs, quotas=[2] * num_seqs,
                               temperatures=[0.0] * num_seqs, seeds=list(range(num_seqs)),
                               random_seeds=list(range(num_seqs)), remasking=["low_confidence"] * num_seqs,
                               device=device)
    rows_cu = [i * num_rows for i in range(num_seqs + 1)]
    return ids, positions, cu, rows.to(device), rows_cu, step_rows


def _run_rank(rank: int, world: int, port: int, path: str, size: str, device: str, iters: int, threads: int,
              out: str) -> None:
    from sampler.block_diffusion import denoise_step
    from server.models.loader import load_model
    from server.models.parallel import Parallel

    torch.set_num_threads(threads)
    parallel = None
    collective = [0.0]
    dev = torch.device(device if device == "cpu" else f"cuda:{rank}")
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
        parallel = Parallel(rank, world)
        # Time spent in collectives: every all_reduce / all_gather, synchronised on CUDA.
        for name in ("all_reduce", "all_gather"):
            real = getattr(dist, name)

            def timed(*a, _real=real, **k):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                r = _real(*a, **k)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                collective[0] += time.perf_counter() - t0
                return r

            setattr(dist, name, timed)
    model = load_model(Path(path), "float32" if dev.type == "cpu" else "bfloat16", str(dev), parallel)
    ids, positions, cu, rows, rows_cu, step_rows = _step_inputs(size, dev)
    vocab = getattr(model, "vocab_shard", None)

    def step():
        with torch.inference_mode():
            logits = model(ids, positions, cu, rows, logits_cu_seqlens=rows_cu)
            x0, commit, _ = denoise_step(logits, step_rows, vocab)
            return commit.sum().item()  # the host reads the result, as the runner does

    for _ in range(2):
        step()
    times, shares = [], []
    for _ in range(iters):
        if world > 1:
            dist.barrier()
        collective[0] = 0.0
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        times.append(dt)
        shares.append(collective[0] / dt)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": statistics.median(times), "collective_share": statistics.median(shares)}))
    if world > 1:
        dist.destroy_process_group()


def measure(path: Path, size: str, device: str, world: int, threads: int, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = str(Path(tmp) / "r.json")
        mp.spawn(_run_rank, args=(world, port, str(path), size, device, iters, threads, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="toy sizes, few iterations (a smoke run)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    size = "quick" if args.quick else "full"
    iters = args.iters or (3 if args.quick else 6)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "ckpt", size)
        params = sum(v.numel() for v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(path / "model.safetensors")).values())
        runs = [("TP=1, 1 thread", 1, 1), ("TP=1, 2 threads", 1, 2), ("TP=2, 1 thread each", 2, 1)]
        if args.device == "cuda":
            runs = [("TP=1", 1, 1), ("TP=2", 2, 1)]
        rows = []
        for name, world, threads in runs:
            r = measure(path, size, args.device, world, threads, iters)
            rows.append(dict(run=name, world=world, threads=threads, **r))
    base = rows[0]["step_s"]
    num_seqs, length, num_rows = BATCH[size]
    print(f"model: {params / 1e6:.0f}M parameters {SIZES[size]}; step: {num_seqs} canvases x {length} tokens, "
          f"LM head on {num_rows} rows each; {iters} steps, median")
    print(f"{'run':22s} {'step ms':>9s} {'speed-up':>9s} {'collectives':>12s}")
    for r in rows:
        share = f"{100 * r['collective_share']:.0f}%" if r["world"] > 1 else "-"
        print(f"{r['run']:22s} {1e3 * r['step_s']:9.1f} {base / r['step_s']:8.2f}x {share:>12s}")
    result = {"device": args.device, "size": size, "params": params, "batch": BATCH[size], "runs": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
