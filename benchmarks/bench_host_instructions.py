"""Host instructions per engine step: bench_host's workload counted by
callgrind, a figure that does not move with the machine's load.

bench_host times a step's host CPU; on a shared machine that time moves
1.5-3x between runs. This counts the instructions the same steps execute
(the same stub model, 320-token canvases, closed loop), so two trees can be
compared side by side while other jobs run. It re-runs itself under
``valgrind --tool=callgrind --instr-atstart=no`` and switches counting on
(``callgrind_control -i on``) only around the counted steps, after the warm-up.

    python benchmarks/bench_host_instructions.py [--decoding dual_cache] [--batch 64] [--steps 20] [--json out.json]

Prints thousands of instructions per step (schedule + execute + update +
admitting the replacements of finished requests). Needs valgrind; a case
takes about a minute (the imports run under valgrind, uncounted).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

WARMUP = 40
_CHILD = "LLADA_HOST_INSTRUCTIONS_CHILD"  # set in the copy that runs under valgrind


def count_steps(decoding: str, batch: int, num_steps: int) -> None:
    """Runs the warm-up, then ``num_steps`` steps with callgrind counting."""
    import itertools

    import torch

    from bench_host import BLOCK_LENGTH, GEN_LENGTH, PROMPT_LEN, StubModel
    from sampler.params import DiffusionParams
    from server.__main__ import bundled_model
    from server.engine.llm import LLM

    torch.set_num_threads(1)
    canvas = PROMPT_LEN + GEN_LENGTH
    llm = LLM(bundled_model(), dtype="float32", device="cpu", max_num_seqs=batch,
              max_num_batched_tokens=batch * canvas, kv_cache_tokens=batch * canvas)
    engine = llm.engine
    engine.stop_ids = frozenset()
    engine.runner.model = StubModel(engine.model, 320, batch * BLOCK_LENGTH)
    params = DiffusionParams(gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, decoding=decoding, seed=0)
    ids, prompt = itertools.count(), [3 + i % 200 for i in range(PROMPT_LEN)]
    sched, runner = engine.scheduler, engine.runner
    running = 0

    def steps(n: int) -> None:
        nonlocal running
        for _ in range(n):
            while running < batch:
                engine.add_request(f"host-{next(ids)}", prompt, params)
                running += 1
            outputs = sched.update(runner.execute(sched.schedule()))
            running -= sum(o.finished for o in outputs)

    def counting(on: bool) -> None:
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], check=True,
                       capture_output=True)
        time.sleep(1)  # callgrind reads the command asynchronously; sleeping costs no instructions

    steps(WARMUP)
    counting(True)
    steps(num_steps)
    counting(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoding", default="dual_cache")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="counted steps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if os.environ.get(_CHILD):
        count_steps(args.decoding, args.batch, args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = dict(os.environ, **{_CHILD: "1"})
        subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                        os.path.realpath(sys.executable), __file__, *sys.argv[1:]], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        total = next(int(line.split()[1]) for line in out.read_text().splitlines() if line.startswith("totals:"))
    # The two callgrind_control calls add a constant ~0.28M instructions (counted with --steps 0).
    per_step = total / max(args.steps, 1)
    print(f"{'decoding':>12} | {'batch':>5} | {'steps':>5} | k instructions/step")
    print(f"{args.decoding:>12} | {args.batch:>5} | {args.steps:>5} | {per_step / 1e3:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "instructions": total,
                                               "instructions_per_step": per_step}, indent=2))


if __name__ == "__main__":
    main()
