"""Task accuracy of a chat model on the demo model's held-out items.

    python benchmarks/eval_tasks.py --model M [--n 50] [decoding options] --json out.json

Exact-match accuracy per synthetic task (add, reverse, sort, continue), and
for verse continuation also the share of generated words that are real
corpus words. ``reverse_unseen`` is reported separately: reversing KJV words
that no training list held (``tools/demo_tasks.is_heldout_word``: 1 in 16
corpus words by hash), so it measures whether reversal generalises. Decoding options are the CLI's (--gen-length, --steps,
--block-length, --temperature, --remasking, --threshold, --factor,
--decoding, --seed). All items of all tasks run as one ragged batch.
JSON: {"tasks": {name: {"accuracy", "n"}}, "tokens_per_second", "decoding": {...}}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sampler.params import DiffusionParams  # noqa: E402
from tools import demo_data, demo_tasks  # noqa: E402


def load_items(n: int, unseen: bool = False) -> dict[str, list]:
    """``n`` held-out items per task; with ``unseen``, also ``n`` reversals of unseen words."""
    items = {task: demo_tasks.heldout_items(task, n) for task in demo_tasks.TASKS}
    if unseen:
        items[demo_tasks.UNSEEN_REVERSE] = demo_tasks.unseen_reversal_items(n)
    return items


def evaluate(llm, items: dict[str, list], params: DiffusionParams, vocabulary: set[str]) -> dict:
    """Runs every item as one batch; returns per-task scores, tokens/s and
    the average tokens committed per forward step."""
    flat = [(task, item) for task, its in items.items() for item in its]
    t0 = time.perf_counter()
    outs = llm.chat([item.messages() for _, item in flat], params)
    wall = time.perf_counter() - t0
    tasks: dict[str, dict] = {}
    for (task, item), out in zip(flat, outs):
        entry = tasks.setdefault(task, {"correct": 0, "n": 0, "real_words": []})
        entry["n"] += 1
        entry["correct"] += demo_tasks.is_correct(item, out.text)
        if task == "continue":
            share = demo_tasks.real_word_share(out.text, vocabulary)
            if share is not None:
                entry["real_words"].append(share)
    result = {}
    for task, e in tasks.items():
        result[task] = {"accuracy": e["correct"] / e["n"], "n": e["n"]}
        if task == "continue":
            result[task]["real_word_share"] = sum(e["real_words"]) / len(e["real_words"]) if e["real_words"] else 0.0
    generated = sum(len(o.token_ids) for o in outs)
    steps = sum(o.num_steps for o in outs)
    return {"tasks": result, "tokens_per_second": generated / wall, "wall_s": wall,
            "tokens_per_step": sum(o.num_committed for o in outs) / max(steps, 1),
            "forward_steps": steps, "outputs": [o.text for o in outs]}


def add_decoding_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gen-length", type=int, default=None, help="default: the model's max_new_tokens, else 32")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--block-length", type=int, default=None, help="default: the model's block_length, else 8")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--remasking", default="low_confidence")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--factor", type=float, default=1.0)
    ap.add_argument("--decoding", default="exact")
    ap.add_argument("--seed", type=int, default=0)


def params_from(args) -> DiffusionParams:
    return DiffusionParams(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                           temperature=args.temperature, remasking=args.remasking, threshold=args.threshold,
                           factor=args.factor, decoding=args.decoding, seed=args.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the bundled demo model")
    ap.add_argument("--n", type=int, default=50, help="held-out items per task")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    add_decoding_args(ap)
    args = ap.parse_args()
    from server.__main__ import bundled_model
    from server.engine.llm import LLM

    from server.models.loader import recommended_decoding

    model = args.model or bundled_model()
    recommended = recommended_decoding(model, gen_length=32, block_length=8)  # the model card's decoding
    args.gen_length = args.gen_length if args.gen_length is not None else recommended["gen_length"]
    args.block_length = args.block_length if args.block_length is not None else recommended["block_length"]
    params = params_from(args)
    llm = LLM(model, dtype=args.dtype, device="cpu", max_num_seqs=256,
              max_num_batched_tokens=1 << 20)
    vocabulary = demo_data.corpus_vocabulary(demo_data.load_verses())
    result = evaluate(llm, load_items(args.n, unseen=True), params, vocabulary)
    print(f"{'task':>14} | {'accuracy':>8} | {'n':>4} | real words")
    for task, r in result["tasks"].items():
        if task == demo_tasks.UNSEEN_REVERSE:
            print("  words no training list held:")
        extra = f"{r['real_word_share']:.1%}" if "real_word_share" in r else ""
        print(f"{task:>14} | {r['accuracy']:>8.1%} | {r['n']:>4} | {extra}")
    print(f"tokens/s {result['tokens_per_second']:.1f}, forward steps {result['forward_steps']}")
    if args.json:
        out = {"tasks": result["tasks"], "tokens_per_second": result["tokens_per_second"],
               "decoding": {k: v for k, v in asdict(params).items()}}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
