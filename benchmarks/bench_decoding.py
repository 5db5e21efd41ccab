"""Speed and accuracy of every decoding mode x commit rule against the
reference sampler, on the demo model's eval tasks, in one process.

    python benchmarks/bench_decoding.py [--model M] --gen-length 256 --block-length 32 --json out.json [--quick]

Rows: ``reference`` (sampler/reference.py: LLaDA's generate(), batched by
prompt length, every step over the whole canvas),
then the engine in each decoding mode (exact, prefix_cache, dual_cache) with
each commit rule (low_confidence with one token per step, threshold,
factor). Columns: tokens/s (answer tokens returned, up to EOS, over wall
time), speedup over the reference, tokens committed per forward step, and
exact-match accuracy over all tasks. The exact row must give the reference's
tokens; the script checks it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_tasks import evaluate, load_items  # noqa: E402
from sampler.params import DiffusionParams  # noqa: E402
from sampler.reference import generate  # noqa: E402
from tools import demo_data, demo_tasks  # noqa: E402

RULES = {"low_confidence": {}, "threshold": {"threshold": 0.9}, "factor": {"factor": 1.0}}
MODES = ("exact", "prefix_cache", "dual_cache")


def run_reference(llm, items: dict[str, list], gen: int, block: int, batch: int) -> tuple[list[str], float, int, int]:
    """The reference sampler over every item, batched by prompt length (no
    padding, so its float rounding is the engine's and answers compare exactly)."""
    tok, model, engine = llm.tokenizer, llm.engine.model, llm.engine
    flat = [item for its in items.values() for item in its]
    prompts = [tok.encode_chat(item.messages()) for item in flat]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    texts, generated, steps = [""] * len(prompts), 0, 0
    t0 = time.perf_counter()
    for indices in by_length.values():
        for j in range(0, len(indices), batch):
            chunk = indices[j:j + batch]
            x = torch.tensor([prompts[i] for i in chunk])
            out = generate(model.forward_dense, x, None, steps=gen, gen_length=gen, block_length=block,
                           mask_id=engine.mask_id)
            for i, row in zip(chunk, out[:, x.shape[1]:].tolist()):
                end = next((k for k, t in enumerate(row) if t in engine.stop_ids), len(row))
                texts[i] = tok.decode(row[:end])
                generated += end
            steps += gen * len(chunk)
    return texts, time.perf_counter() - t0, generated, steps


def accuracy(items: dict[str, list], texts: list[str]) -> float:
    flat = [item for its in items.values() for item in its]
    return sum(demo_tasks.is_correct(item, t) for item, t in zip(flat, texts)) / len(flat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the bundled demo model")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--n", type=int, default=16, help="held-out items per task")
    ap.add_argument("--batch", type=int, default=16, help="reference batch size")
    ap.add_argument("--quick", action="store_true", help="4 items per task, gen 64: a smoke run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.gen_length = 4, min(args.gen_length, 64)
    from server.__main__ import bundled_model
    from server.engine.llm import LLM

    gen, block = args.gen_length, args.block_length
    llm = LLM(args.model or bundled_model(), dtype="float32", device="cpu", max_num_seqs=args.batch,
              max_num_batched_tokens=1 << 20)
    items = load_items(args.n)
    vocabulary = demo_data.corpus_vocabulary(demo_data.load_verses())
    num_items = sum(map(len, items.values()))

    ref_texts, ref_wall, ref_tokens, ref_steps = run_reference(llm, items, gen, block, args.batch)
    rows = [{"name": "reference", "decoding": "reference", "remasking": "low_confidence",
             "tokens_per_second": ref_tokens / ref_wall, "speedup": 1.0,
             "tokens_per_step": gen * num_items / ref_steps, "accuracy": accuracy(items, ref_texts),
             "wall_s": ref_wall}]
    for mode in MODES:
        for rule, knobs in RULES.items():
            params = DiffusionParams(gen_length=gen, steps=gen, block_length=block, remasking=rule,
                                     decoding=mode, seed=0, **knobs)
            r = evaluate(llm, items, params, vocabulary)
            if mode == "exact" and rule == "low_confidence":
                assert r["outputs"] == ref_texts, "exact mode must give the reference's answers"
            acc = sum(t["accuracy"] * t["n"] for t in r["tasks"].values()) / num_items
            rows.append({"name": f"{mode}/{rule}", "decoding": mode, "remasking": rule,
                         "tokens_per_second": r["tokens_per_second"], "speedup": ref_wall / r["wall_s"],
                         "tokens_per_step": r["tokens_per_step"], "accuracy": acc, "wall_s": r["wall_s"]})
    print(f"{num_items} items ({args.n} per task), gen {gen}, block {block}, float32, "
          f"{torch.get_num_threads()} threads; speedup = reference wall time / row wall time")
    print(f"{'name':>28} | {'tok/s':>7} | {'speedup':>7} | {'tok/step':>8} | {'accuracy':>8}")
    for r in rows:
        print(f"{r['name']:>28} | {r['tokens_per_second']:>7.1f} | {r['speedup']:>6.1f}x | "
              f"{r['tokens_per_step']:>8.2f} | {r['accuracy']:>8.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gen_length": gen, "block_length": block, "n_per_task": args.n,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
