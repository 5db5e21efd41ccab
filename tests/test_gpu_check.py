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
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:]
    merged = json.loads((out / "gpu_check.json").read_text())
    assert list(merged["parts"]) == order
    assert not merged["parts"]["no_such_part"]["ok"]
    for name in parts:
        rec = merged["parts"][name]
        assert rec["ok"] and rec["small"] and rec["summary"], (name, rec)
    # The decode part's issue-20 ratio: a dual_cache use step against its share of an exact step.
    shares = merged["parts"]["decode"]["shares"]
    # one row per graphs setting (off, then on: the padded bucketed step) and concurrency
    assert [(s["graphs"], s["concurrency"]) for s in shares] == [("off", 1), ("off", 4), ("on", 1), ("on", 4)]
    assert all(0 < s["flop_share"] < 1 and s["x_flop_share"] > 0 for s in shares)
    summary = (out / "summary.txt").read_text()
    assert summary.rstrip().endswith("FAILED: no_such_part") and all(name in summary for name in parts)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "summary.txt"]


def test_part_limits_fit_the_eight_minute_run():
    """Issue 14 item 7: one run under 8 minutes. The parts' hard limits sum to
    at most the default budget, and the budget leaves the start-up under 480 s."""
    import re

    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    block = script[script.index("PARTS=("):]
    block = block[:block.index(")")]
    limits = [int(n) for n in re.findall(r'"\w+ (\d+)"', block)]
    budget = int(re.search(r"GPU_CHECK_BUDGET:-(\d+)", script).group(1))
    assert len(limits) >= 6 and sum(limits) <= budget <= 470


def test_decode_floor_counts_the_real_model():
    """The decode part's roofline: per-step weight bytes equal the LLaDA-8B
    model's own parameters (the embedding, only gathered, and the norms
    aside), and an exact step's FLOPs grow as 2 x those weights per token."""
    import sys

    import torch

    sys.path.insert(0, str(REPO / "benchmarks" / "gpu_parts"))
    from _llada8b import config
    from decode import step_cost

    from server.models.llada import LLaDAModel

    cfg = config(small=False)
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    matrices = sum(p.numel() for n, p in model.named_parameters()
                   if not n.endswith("norm.weight") and n not in ("ln_f.weight", "wte.weight"))
    assert 7.4e9 < matrices < 7.6e9  # 8.0B parameters with the embedding
    flops, nbytes = step_cost([], cfg)
    assert (flops, nbytes) == (0, 2 * matrices)
    one, _ = step_cost([(320, (64, 96), None, "exact", 0)], cfg)
    two, _ = step_cost([(320, (64, 96), None, "exact", 0)] * 2, cfg)
    head = 2 * cfg.d_model * cfg.embedding_size  # the LM head is not run on a row without logits
    attention = 4 * cfg.n_layers * cfg.d_model * 320 * 320
    assert one == 2 * (matrices - head // 2) * 320 + attention and two == 2 * one


def test_a_part_ended_by_the_drivers_timeout_still_writes_its_record(tmp_path):
    """gpu_check.sh's `timeout` sends SIGTERM: the part's record is written
    with what it measured so far, marked failed."""
    import signal
    import sys

    script = tmp_path / "slow_part.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(REPO / 'benchmarks' / 'gpu_parts')!r})\n"
        "from _part import run_part\n"
        "def body(args, rec):\n"
        "    rec.line('measured before the timeout')\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "run_part('slow', body)\n")
    record = tmp_path / "slow.json"
    proc = subprocess.Popen([sys.executable, str(script), "--json", str(record)], stdout=subprocess.PIPE, text=True)
    assert [proc.stdout.readline().strip() for _ in range(2)] == ["measured before the timeout", "ready"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 1  # a failed part, its record written
    rec = json.loads(record.read_text())
    assert not rec["ok"] and rec["summary"][0] == "measured before the timeout"
