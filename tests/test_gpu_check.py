"""benchmarks/gpu_check.sh dry-run on CPU (--small): every part runs without
a Python error and writes its record, a missing part fails the run without
stopping the next, and the merged JSON and summary land in $OUT."""
from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import REPO


def test_every_part_dry_runs_on_cpu(tmp_path):
    parts = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--list"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    assert "kernel_tests" in parts
    out = tmp_path / "out"
    # A fresh checkpoint folder, so the dry run also writes the toy 8B-shaped checkpoint.
    env = dict(os.environ, OUT=str(out), PYTHONPATH=str(REPO), LLADA_8B_DIR=str(tmp_path / "ckpt"))
    order = ["no_such_part", *parts]  # a missing part first: the real ones still run
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--small", "--parts", ",".join(order)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    merged = json.loads((out / "gpu_check.json").read_text())
    assert list(merged["parts"]) == order
    assert not merged["parts"]["no_such_part"]["ok"]
    for name in parts:
        rec = merged["parts"][name]
        assert rec["ok"] and rec["small"] and rec["summary"], (name, rec)
    summary = (out / "summary.txt").read_text()
    assert summary.rstrip().endswith("FAILED: no_such_part") and all(name in summary for name in parts)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "summary.txt"]
