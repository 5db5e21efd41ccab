"""Offline decoding speed: the reference sampler (sampler/reference.py, the
whole canvas and the LM head over it at every step) against the engine
(``LLM.generate``: one ragged batch, LM head only on the current block's
masked positions, zero-quota steps skipped), side by side in one process on
one random LLaDA checkpoint made on the fly.

    python benchmarks/bench_offline.py [--quick] [--json out.json]

Prints a table and writes JSON. Both paths must give identical tokens
(greedy decoding); the script checks it.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sampler.params import DiffusionParams  # noqa: E402
from sampler.reference import generate  # noqa: E402
from server.engine.llm import LLM  # noqa: E402
from server.models.llada import LLaDAConfig, LLaDAModel  # noqa: E402
from server.models.writer import save_checkpoint  # noqa: E402


def make_checkpoint(out: Path, vocab: int, d_model: int, layers: int) -> int:
    cfg = LLaDAConfig(d_model=d_model, n_heads=d_model // 64, n_layers=layers, mlp_hidden_size=int(d_model * 8 / 3) // 64 * 64,
                      vocab_size=vocab, rope_theta=500000.0, max_sequence_length=1024,
                      mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2)
    cfg.validate()
    model = LLaDAModel(cfg)
    model.init_random(0, std=0.02)
    save_checkpoint(model, out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke run in seconds")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        vocab, d_model, layers, gen, block, steps, prompt_len = 32000, 128, 2, 32, 16, 32, 8
    else:
        vocab, d_model, layers, gen, block, steps, prompt_len = 32000, 384, 6, 128, 32, 128, 16
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        num_params = make_checkpoint(Path(tmp), vocab, d_model, layers)
        llm = LLM(tmp, dtype="float32", device="cpu", max_num_seqs=64)
    model, mask_id = llm.engine.model, llm.engine.mask_id
    params = DiffusionParams(gen_length=gen, block_length=block, steps=steps, seed=0)
    # Warm both paths up (allocator, BLAS, tables) so neither pays first-call costs in the timing.
    warm = torch.randint(0, vocab - 2, (1, prompt_len))
    generate(model.forward_dense, warm, None, steps=block, gen_length=block, block_length=block, mask_id=mask_id)
    llm.generate([warm[0].tolist()], DiffusionParams(gen_length=block, block_length=block, steps=block, seed=0))
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(0, vocab - 2, (batch, prompt_len))
        t0 = time.perf_counter()
        ref = generate(model.forward_dense, prompts, None, steps=steps, gen_length=gen, block_length=block,
                       mask_id=mask_id)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = llm.generate([p.tolist() for p in prompts], params)
        t_llm = time.perf_counter() - t0
        stop = llm.engine.stop_ids
        for row, out in zip(ref[:, prompt_len:].tolist(), outs):
            first = next((i for i, t in enumerate(row) if t in stop), len(row))
            assert out.token_ids == row[:first], "engine and reference disagree"
        toks = batch * gen
        rows.append({"batch": batch, "reference_tok_s": toks / t_ref, "engine_tok_s": toks / t_llm,
                     "speedup": t_ref / t_llm, "reference_s": t_ref, "engine_s": t_llm})
    print(f"random LLaDA {num_params / 1e6:.1f}M params, vocab {vocab}, gen {gen}, block {block}, steps {steps}, "
          f"prompt {prompt_len}, float32, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'batch':>5} | {'reference tok/s':>15} | {'engine tok/s':>12} | {'speedup':>7}")
    for r in rows:
        print(f"{r['batch']:>5} | {r['reference_tok_s']:>15.1f} | {r['engine_tok_s']:>12.1f} | {r['speedup']:>6.2f}x")
    if len(rows) > 1:
        print(f"engine batch {rows[-1]['batch']} vs batch {rows[0]['batch']}: "
              f"{rows[-1]['engine_tok_s'] / rows[0]['engine_tok_s']:.2f}x tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"params_m": num_params / 1e6, "vocab": vocab, "gen_length": gen,
                                               "block_length": block, "steps": steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
