"""``llada-serve eval``: lm-evaluation-harness against a running server.

    llada-serve eval --base-url http://127.0.0.1:8000 --tasks llada_demo_reverse,llada_demo_reverse_mc \\
        --apply-chat-template [--limit 20] [--mc-num 128] [--num-concurrent 8] [--output results.json]

Runs lm-eval's tasks (its own, those shipped in server/eval/tasks/, and any
under ``--include-path``) through the ``llada-serve`` model of
``lm_eval_adapter``, prints lm-eval's table and, with ``--output``, writes
lm-eval's results JSON plus the wall time. Needs the ``eval`` extra.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _value(text: str):
    """A --model-args value as JSON when it parses (numbers, booleans), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (with or without /v1)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--model-name", default=None, help="the served model's name (default: whatever it serves)")
    p.add_argument("--limit", type=float, default=None, help="items per task (a fraction below 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--apply-chat-template", action="store_true",
                   help="format prompts with the model's chat template (the server's); needed for chat tasks")
    p.add_argument("--num-concurrent", type=int, default=8, help="HTTP requests in flight")
    p.add_argument("--mc-num", type=int, default=128, help="Monte Carlo samples per likelihood (the reference's 128)")
    p.add_argument("--no-greedy-check", action="store_true",
                   help="skip the likelihoods' greedy check (is_greedy false; multiple choice does not use it)")
    p.add_argument("--seed", type=int, default=1234, help="seed of generation noise and likelihood mask draws")
    p.add_argument("--model-args", default="",
                   help="extra generation body fields, key=value,... (e.g. steps=32,block_length=8)")
    p.add_argument("--api-key", default=None, help="the server's --api-key")
    p.add_argument("--timeout", type=float, default=3600,
                   help="seconds one HTTP request may take (requests wait for each other's work in the batch)")
    p.add_argument("--include-path", default=None, help="another directory of lm-eval task YAMLs")
    p.add_argument("--output", default=None, help="write the results JSON here")


def run_eval(args: argparse.Namespace) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        print("llada-serve: error: eval needs lm-eval: pip install 'llada-serve[eval]'", file=sys.stderr)
        return 2
    from server.eval.lm_eval_adapter import LLaDAServeLM

    extra = {}
    for item in filter(None, args.model_args.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            print(f"llada-serve: error: --model-args: expected key=value, got {item!r}", file=sys.stderr)
            return 2
        extra[key.strip()] = _value(value.strip())
    lm = LLaDAServeLM(base_url=args.base_url, model=args.model_name, num_concurrent=args.num_concurrent,
                      mc_num=args.mc_num, seed=args.seed, check_greedy=not args.no_greedy_check,
                      api_key=args.api_key, timeout=args.timeout, **extra)
    include = [str(TASKS_DIR)] + ([args.include_path] if args.include_path else [])
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[t for t in args.tasks.split(",") if t], num_fewshot=args.num_fewshot, limit=limit,
        task_manager=TaskManager(include_path=include), apply_chat_template=args.apply_chat_template,
        log_samples=False, random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
        fewshot_random_seed=args.seed)
    wall = time.perf_counter() - started
    print(make_table(results))
    print(f"wall time {wall:.1f} s")
    if args.output:
        out = {"results": results["results"], "n_samples": results.get("n-samples"), "wall_s": wall,
               "config": {k: v for k, v in vars(args).items() if k != "api_key"}}
        Path(args.output).write_text(json.dumps(out, indent=2, default=str))
    return 0
