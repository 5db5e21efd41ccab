"""Defaults and docs agree with the code: the served name of the bundled
model, ``llada-serve --help``, the README's stated defaults, ``generate``'s
decoding flags, and a hub model downloading after the server listens."""
from __future__ import annotations

import inspect
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

from sampler.params import DiffusionParams
from server.__main__ import build_parser, main
from server.api.launch import build_configs
from server.engine.llm import LLM
from server.engine.scheduler import SchedulerConfig
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_the_bundled_model_is_served_as_llada_demo():
    served = lambda *argv: build_configs(build_parser().parse_args(["serve", *argv]))[2].served_model_name
    assert served() == "llada-demo"
    assert served("--model", "org/name") == "org/name"
    assert served("--served-model-name", "mine") == "mine"


def test_top_level_help_shows_the_servers_flags():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--port", "--max-num-batched-tokens", "--drain-timeout", "--default-max-tokens"):
        assert flag in out.stdout, flag
    assert "generate --help" in out.stdout


def _table_defaults() -> dict[str, str]:
    """The Flags table's default cell per flag (rows naming several flags split)."""
    section = README[README.index("### Flags"):]
    section = section[:section.index("\n\n**")]
    out = {}
    for flags, default in re.findall(r"^\| (`--[^|]+) \| ([^|]+) \|", section, re.M):
        names = re.findall(r"`(--[a-z-]+)`", flags)
        values = [v.strip() for v in default.split(",")] if len(names) > 1 else [default.strip()]
        if len(values) == len(names):
            out.update(zip(names, values))
    return out


def test_readme_defaults_are_the_codes():
    args = vars(build_parser().parse_args(["serve"]))
    table = _table_defaults()
    checked = 0
    for flag, cell in table.items():
        value = args[flag[2:].replace("-", "_")]
        literal = re.fullmatch(r"`([^`]+)`|(\d+(?:\.\d+)?)", cell)
        if literal and literal.group(1) is not None:
            assert str(value) == literal.group(1), (flag, cell, value)
            checked += 1
        elif literal:
            assert float(value) == float(literal.group(2)), (flag, cell, value)
            checked += 1
    assert checked >= 10, table
    # "else N": DiffusionParams' built-ins, which the server, generate and LLM fall back on
    assert re.search(r"else (\d+)", table["--default-max-tokens"]).group(1) == str(DiffusionParams.gen_length)
    assert re.search(r"else (\d+)", table["--default-block-length"]).group(1) == str(DiffusionParams.block_length)
    gen_help = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    assert f"else {DiffusionParams.gen_length})" in gen_help["gen_length"]
    assert f"else {DiffusionParams.block_length})" in gen_help["block_length"]
    canvas = re.search(r"a (\d+)-token\s+canvas in blocks of (\d+)\.", README)
    assert (int(canvas.group(1)), int(canvas.group(2))) == (DiffusionParams.gen_length, DiffusionParams.block_length)
    # LLM's batch limits: the server's
    stated = re.search(r"max_num_seqs=(\d+),\s*max_num_batched_tokens=(\d+)", README)
    sig = inspect.signature(LLM.__init__).parameters
    for name, text in zip(("max_num_seqs", "max_num_batched_tokens"), stated.groups()):
        assert sig[name].default == int(text) == args[name] == getattr(SchedulerConfig, name), name


def test_generate_takes_the_decoding_knobs(golden_dir, monkeypatch, capsys):
    seen = []
    real = LLM.generate

    def generate(self, prompts, params=None, on_step=None):
        seen.append(params)
        return real(self, prompts, params, on_step)

    monkeypatch.setattr(LLM, "generate", generate)
    flags = {"--decoding": "dual_cache", "--remasking": "factor", "--factor": "2.5", "--threshold": "0.6",
             "--temperature": "0.7", "--top-k": "5", "--top-p": "0.9", "--gen-length": "12", "--block-length": "4",
             "--steps": "6", "--seed": "3"}
    argv = ["generate", "--model", str(golden_dir), "--dtype", "float32", "--device", "cpu", "--prompt-ids", "5,6,7"]
    assert main(argv + [x for kv in flags.items() for x in kv]) == 0
    printed = capsys.readouterr().out.split()
    p = seen[0]
    assert (p.decoding, p.remasking, p.factor, p.threshold, p.temperature, p.top_k, p.top_p, p.gen_length,
            p.block_length, p.steps, p.seed) == ("dual_cache", "factor", 2.5, 0.6, 0.7, 5, 0.9, 12, 4, 6, 3)
    monkeypatch.undo()
    expected = LLM(str(golden_dir), dtype="float32", device="cpu").generate([[5, 6, 7]], p)[0]
    assert printed == [str(t) for t in expected.token_ids]


# Stands in for the hub: the "download" waits until the test lets it finish.
SLOW_HUB = """
import pathlib, sys, time
import huggingface_hub
gate, ckpt = pathlib.Path(sys.argv[1]), sys.argv[2]
def snapshot_download(repo_id, **kwargs):
    while not gate.exists():
        time.sleep(0.05)
    return ckpt
huggingface_hub.snapshot_download = snapshot_download
from server.__main__ import main
sys.exit(main(sys.argv[3:]))
"""


def test_a_hub_model_downloads_after_the_server_listens(golden_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, gate = f"http://127.0.0.1:{port}", tmp_path / "downloaded"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_HUB, str(gate), str(golden_dir), "--model", "org/slow-model",
                             "--port", str(port), "--dtype", "float32", "--log-level", "warning"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def get(path: str) -> httpx.Response | None:
        try:
            return httpx.get(url + path, timeout=5)
        except httpx.TransportError:
            return None

    try:
        deadline = time.monotonic() + 60
        while (r := get("/live")) is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert r is not None and r.status_code == 200, "the server did not listen while the model downloaded"
        health = get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        refused = httpx.post(url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 4})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "loading"
        gate.touch()  # the download finishes; the model loads
        deadline = time.monotonic() + 60
        while ((r := get("/health")) is None or r.status_code != 200) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.status_code == 200
        done = httpx.post(url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 4, "block_length": 4},
                          timeout=60)
        assert done.status_code == 200 and done.json()["model"] == "org/slow-model"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
