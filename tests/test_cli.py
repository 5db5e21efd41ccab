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


def test_model_recommended_decoding_is_the_default(golden_dir, tmp_path):
    """generation_config.json's max_new_tokens / block_length are the
    defaults; flags given on the command line win."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(golden_dir, model)
    gen_config = json.loads((model / "generation_config.json").read_text()) \
        if (model / "generation_config.json").is_file() else {}
    (model / "generation_config.json").write_text(json.dumps(gen_config | {"max_new_tokens": 6, "block_length": 3}))
    steps = [l for l in run("generate", "--model", str(model), "--prompt-ids", "204,68,268",
                            "--show-steps").stdout.splitlines() if l.startswith("step")]
    assert len(steps) == 6 and steps[0].count("░") == 5
    assert all("/2 " in l for l in steps)  # two blocks of 3 (the built-in 32 would make one)
    steps = [l for l in run("generate", "--model", str(model), "--prompt-ids", "204,68,268", "--gen-length", "9",
                            "--block-length", "9", "--show-steps").stdout.splitlines() if l.startswith("step")]
    assert len(steps) == 9 and all("/1 " in l for l in steps)

    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 0}))
    out = run("generate", "--model", str(model), "--prompt-ids", "1,2")
    assert out.returncode == 2 and "max_new_tokens must be a positive integer, got 0" in out.stderr
