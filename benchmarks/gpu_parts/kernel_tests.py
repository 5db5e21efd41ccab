"""gpu_check part (a): the kernel tests compiled for the GPU (bfloat16 and
LLaDA-8B shapes included), then bench_attention.py and bench_unmask.py, each
in its own process with its own time limit, so one failing leaves the others.
--small collects the tests only and skips the benches (their own --quick
CPU smoke runs take minutes under the Triton interpreter)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _part import REPO, Record, run_part


def _run(cmd: list[str], limit: float, env: dict[str, str]) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\n(timed out after {limit:.0f}s)", 124
    print(out, flush=True)
    return rc, out


def body(args, rec: Record) -> None:
    env = dict(os.environ)
    if not args.small:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    work = Path(tempfile.mkdtemp(prefix="gpu_kernels_"))

    with rec.sub("pytest"):
        # The MoE kernel's tests run in the moe part, under their own time limit.
        cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-rs", "-p", "no:cacheprovider",
               "--ignore=tests/kernels/test_moe.py", "--ignore=tests/kernels/test_moe_models.py"]
        rc, out = _run(cmd + (["--collect-only"] if args.small else []), args.pytest_limit, env)
        tail = [ln for ln in out.splitlines() if re.search(r"\b(passed|failed|error|collected)\b", ln)]
        rec.check("pytest", rc == 0, rc=rc, tail=tail[-1] if tail else "")
        rec.line(f"kernel tests: {'ok' if rc == 0 else f'FAILED rc={rc}'}  {tail[-1] if tail else ''}")

    if args.small:
        rec.line("benches: skipped in --small")
        return
    for bench, limit in (("attention", args.attention_limit), ("unmask", args.unmask_limit)):
        with rec.sub(f"bench_{bench}"):
            path = work / f"{bench}.json"
            rc, _ = _run([sys.executable, f"benchmarks/bench_{bench}.py", "--iters", str(args.iters), "--json", str(path)], limit, env)
            report = json.loads(path.read_text()) if path.exists() else {}
            rec.data[f"bench_{bench}"] = report
            rec.check(f"bench_{bench}", rc == 0 and bool(report), rc=rc)
            if not report:
                rec.line(f"bench_{bench}: FAILED rc={rc}")
                continue
            if bench == "attention":
                rec.line(f"{'attention':24s} {'ours us':>9s} {'x sdpa loop':>11s} {'x sdpa dense':>12s} {'floor':>6s}")
                for r in report["rows"]:
                    name = f"{r['case']} b{r['batch']} q{r['q_len']} kv{r['cache_len']}"
                    rec.line(f"{name:24s} {r['ours_us']:9.1f} {r['speedup_vs_loop']:11.2f} "
                             f"{r['speedup_vs_batched']:12.2f} {r['floor_frac']:6.1%}")
            else:
                rec.line(f"{'unmask':24s} {'ours us':>9s} {'x torch':>11s} {'':>12s} {'floor':>6s}")
                for r in report["rows"]:
                    name = f"{r['case']} b{r['batch']} rows{r['rows']}"
                    rec.line(f"{name:24s} {r['ours_us']:9.1f} {r['speedup']:11.2f} {'':>12s} {r['floor_frac']:6.1%}")


def add_args(ap) -> None:
    ap.add_argument("--iters", type=int, default=20)
    # pytest + the two benches (62 + 25 + 12 s) stay within the part's limit in gpu_check.sh (105 s).
    ap.add_argument("--pytest-limit", type=float, default=62)
    ap.add_argument("--attention-limit", type=float, default=25)
    ap.add_argument("--unmask-limit", type=float, default=12)


if __name__ == "__main__":
    run_part("kernel_tests", body, add_args)
