"""The ``llada-serve generate`` command on the golden checkpoint."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, golden_rows


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO, capture_output=True, text=True)


def test_generate_prints_the_reference_completion(golden_dir):
    name, prompt, p, expected = golden_rows()[0]
    out = run("generate", "--model", str(golden_dir), "--dtype", "float32", "--prompt-ids", ",".join(map(str, prompt)),
              "--gen-length", str(p["gen_length"]), "--steps", str(p["steps"]), "--block-length", str(p["block_length"]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(t) for t in expected]


def test_show_steps_prints_every_step(golden_dir):
    out = run("generate", "--model", str(golden_dir), "--prompt-ids", "204,68,268", "--gen-length", "8",
              "--block-length", "4", "--show-steps")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    steps = [l for l in lines if l.startswith("step")]
    assert len(steps) == 8
    assert steps[0].count("░") == 7 and "░" not in steps[-1]  # one commit per step


def test_errors_are_clear(golden_dir):
    out = run("generate", "--model", str(golden_dir), "--prompt-ids", "1,2", "--steps", "0")
    assert out.returncode == 2 and "steps: must be a positive integer" in out.stderr
    out = run("generate", "--model", str(golden_dir), "--prompt", "hello")
    assert out.returncode == 2 and "no tokenizer files" in out.stderr
    out = run("generate", "--model", str(golden_dir), "--prompt-ids", "1,x")
    assert out.returncode == 2 and "--prompt-ids: expected comma-separated integers" in out.stderr
    out = run("generate", "--model", str(golden_dir), "--prompt-ids", "1,400")
    assert out.returncode == 2 and "token id 400 is outside the vocabulary" in out.stderr
