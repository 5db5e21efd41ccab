"""gpu_check part: the fused MoE kernel compiled for the GPU. Its tests
(tests/kernels/test_moe.py and test_moe_models.py: bfloat16 included, the
LLaDA-MoE and LLaDA2 goldens through the kernel on CUDA; the kernel_tests
part leaves them to this part), then benchmarks/bench_moe.py at LLaDA2.0-mini's
shapes (kernel vs torch twin vs a loop over experts, and the kernel against
its floor), each in its own process with its own time limit. --small
collects the tests only and runs the bench's CPU smoke shapes (twin vs loop)."""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

from _part import Record, run_part
from kernel_tests import _run

TESTS = ["tests/kernels/test_moe.py", "tests/kernels/test_moe_models.py"]
MAX_REL_ERROR = 2e-2  # bfloat16 kernel against the bfloat16 twin, whole output


def body(args, rec: Record) -> None:
    env = dict(os.environ)
    if not args.small:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter

    with rec.sub("pytest"):
        cmd = [sys.executable, "-m", "pytest", *TESTS, "-q", "-rs", "-p", "no:cacheprovider"]
        rc, out = _run(cmd + (["--collect-only"] if args.small else []), args.pytest_limit, env)
        tail = [ln for ln in out.splitlines() if re.search(r"\b(passed|failed|error|collected)\b", ln)]
        rec.check("pytest", rc == 0, rc=rc, tail=tail[-1] if tail else "")
        rec.line(f"moe tests: {'ok' if rc == 0 else f'FAILED rc={rc}'}  {tail[-1] if tail else ''}")

    with rec.sub("bench_moe"):
        path = Path(tempfile.mkdtemp(prefix="gpu_moe_")) / "moe.json"
        flags = ["--quick", "--device", "cpu"] if args.small else ["--iters", str(args.iters)]
        rc, _ = _run([sys.executable, "benchmarks/bench_moe.py", *flags, "--json", str(path)], args.bench_limit, env)
        report = json.loads(path.read_text()) if path.exists() else {}
        rec.data["bench_moe"] = report
        rec.check("bench_moe", rc == 0 and bool(report), rc=rc)
        if not report:
            rec.line(f"bench_moe: FAILED rc={rc}")
            return
        if args.small:
            rec.line(f"bench_moe: {len(report['rows'])} CPU smoke rows (twin vs loop), no measurement")
            return
        rec.line(f"{'moe tokens':16s} {'kernel us':>9s} {'x twin':>7s} {'x loop':>7s} {'floor':>6s} {'rel err':>8s}")
        for r in report["rows"]:
            ok = r["kernel_vs_twin_rel"] < MAX_REL_ERROR
            rec.check(f"moe_{r['tokens']}_{r['routing']}_matches_twin", ok, rel=r["kernel_vs_twin_rel"])
            rec.line(f"{r['tokens']:5d} {r['routing']:10s} {r['kernel_us']:9.1f} {r['kernel_speedup_vs_twin']:7.2f} "
                     f"{r['kernel_speedup_vs_loop']:7.2f} {r['floor_frac']:6.1%} {r['kernel_vs_twin_rel']:8.1e}")


def add_args(ap) -> None:
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--pytest-limit", type=float, default=34)
    ap.add_argument("--bench-limit", type=float, default=16)


if __name__ == "__main__":
    run_part("moe", body, add_args)
