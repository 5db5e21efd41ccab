"""gpu_check part: tensor parallelism on two GPUs (NCCL), when the machine
has them: the llada-tiny golden cases through ``LLM(tensor_parallel_size=2)``
in float32 token for token against one GPU, then benchmarks/bench_tp.py
(step time at TP 1 and 2, the collectives' share). With fewer than two GPUs
the part is skipped with a note (it passes: nothing to measure). --small
takes the same decision on the CPU (no GPU: skipped)."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from _part import REPO, Record, run_part
from kernel_tests import _run

GOLDEN = [REPO / "shared" / "golden" / "llada-tiny", REPO.parent / "shared" / "golden" / "llada-tiny"]


def body(args, rec: Record) -> None:
    import torch

    gpus = torch.cuda.device_count()
    rec.data["gpus"] = gpus
    if gpus < 2:
        rec.line(f"tp: skipped, {gpus} GPU(s) here; TP 2 needs two (CPU/gloo equality runs in tests/parallel)")
        return
    with rec.sub("golden_tp2"):
        _golden(rec)
    with rec.sub("bench_tp"):
        path = Path(tempfile.mkdtemp(prefix="gpu_tp_")) / "tp.json"
        rc, _ = _run([sys.executable, "benchmarks/bench_tp.py", "--device", "cuda", "--json", str(path)],
                     args.bench_limit, dict(os.environ))
        report = json.loads(path.read_text()) if path.exists() else {}
        rec.data["bench_tp"] = report
        rec.check("bench_tp", rc == 0 and bool(report), rc=rc)
        for r in report.get("runs", []):
            rec.line(f"{r['run']:8s} step {1e3 * r['step_s']:7.2f} ms  collectives {100 * r['collective_share']:.0f}%")


def _golden(rec: Record) -> None:
    from sampler.params import DiffusionParams
    from server.engine.llm import LLM

    golden = next((p for p in GOLDEN if p.is_dir()), None)
    if golden is None:
        raise FileNotFoundError("shared/golden/llada-tiny not found")
    cases = json.loads((golden / "generate_cases.json").read_text())["cases"]
    prompts = [c["prompt"][0] for c in cases]
    params = [DiffusionParams(**{k: c["params"][k] for k in ("steps", "gen_length", "block_length", "temperature",
                                                             "cfg_scale", "remasking")}) for c in cases]
    tp2 = LLM(str(golden), dtype="float32", device="cuda", tensor_parallel_size=2)
    got = [o.token_ids for o in tp2.generate(prompts, params)]
    tp2.close()
    want = [o.token_ids for o in LLM(str(golden), dtype="float32", device="cuda").generate(prompts, params)]
    same = sum(a == b for a, b in zip(got, want))
    rec.check("golden_tp2_equals_tp1", same == len(want), same=same, cases=len(want))
    rec.line(f"tp golden: {same}/{len(want)} cases at TP=2 equal one GPU (float32, batched)")


def add_args(ap) -> None:
    ap.add_argument("--bench-limit", type=float, default=20)


if __name__ == "__main__":
    run_part("tp", body, add_args)
