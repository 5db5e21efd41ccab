"""Checkpoint loading: formats, dtypes, every bad-checkpoint error, memory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.models.loader import CheckpointError, load_model, resolve_model_path
from tests.conftest import REPO, make_random_checkpoint


def copy_golden(golden_dir, dst):
    dst.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(golden_dir / name, dst / name)
    return dst


def test_sharded_checkpoint_gives_same_logits(golden_dir, tmp_path):
    ref = load_model(golden_dir, "float64", "cpu")
    sharded = tmp_path / "sharded"
    from server.models.writer import save_checkpoint
    save_checkpoint(load_model(golden_dir, "float32", "cpu"), sharded, num_shards=3)
    assert not (sharded / "model.safetensors").exists()
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) == 21
    model = load_model(sharded, "float64", "cpu")
    ids = torch.arange(30).view(2, 15)
    assert torch.equal(model.forward_dense(ids), ref.forward_dense(ids))


@pytest.mark.parametrize("dtype,expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16),
                                            ("float16", torch.float16), ("float64", torch.float64)])
def test_dtypes(golden_dir, dtype, expected):
    model = load_model(golden_dir, dtype, "cpu")
    assert model.dtype == expected
    assert all(p.dtype == expected for p in model.parameters())
    want = load_file(str(golden_dir / "model.safetensors"))["model.transformer.wte.weight"].to(expected)
    assert torch.equal(model.wte.weight, want)


def test_auto_dtype_follows_checkpoint(tmp_path):
    ckpt = make_random_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    assert load_model(ckpt, "auto", "cpu").dtype == torch.bfloat16


def _break(golden_dir, tmp_path, edit):
    ckpt = copy_golden(golden_dir, tmp_path / "ckpt")
    edit(ckpt)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, "float32", "cpu")
    return str(err.value)


def _edit_config(**changes):
    def edit(ckpt):
        raw = json.loads((ckpt / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                raw.pop(k, None)
            else:
                raw[k] = v
        (ckpt / "config.json").write_text(json.dumps(raw))
    return edit


def _edit_tensors(fn):
    def edit(ckpt):
        tensors = load_file(str(ckpt / "model.safetensors"))
        fn(tensors)
        save_file(tensors, str(ckpt / "model.safetensors"))
    return edit


BAD = {
    "missing config": (lambda c: (c / "config.json").unlink(), "config.json: missing"),
    "bad json": (lambda c: (c / "config.json").write_text("{nope"), "config.json: not valid JSON"),
    "unknown architecture": (_edit_config(architectures=["GPT2LMHeadModel"]), "unknown architecture GPT2LMHeadModel"),
    "no architectures": (_edit_config(architectures=None), "no 'architectures' field"),
    "missing field": (_edit_config(n_layers=None), "missing field(s) n_layers"),
    "unsupported feature": (_edit_config(alibi=True), "alibi=True is not supported"),
    "missing tensor": (_edit_tensors(lambda t: t.pop("model.transformer.blocks.1.up_proj.weight")),
                       "missing tensor model.transformer.blocks.1.up_proj.weight"),
    "unexpected tensor": (_edit_tensors(lambda t: t.update({"model.transformer.extra.weight": torch.zeros(2)})),
                          "unexpected tensor model.transformer.extra.weight"),
    "shape mismatch": (_edit_tensors(lambda t: t.update({"model.transformer.ln_f.weight": torch.zeros(63)})),
                       "tensor model.transformer.ln_f.weight has shape [63], the config implies [64]"),
    "config disagrees with weights": (_edit_config(mlp_hidden_size=100),
                                      "ff_out.weight has shape [64, 176], the config implies [64, 100]"),
    "not safetensors": (lambda c: (c / "model.safetensors").write_bytes(b"\x00" * 4), "not a safetensors file"),
    "truncated": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-100]),
                  "runs past the end of the file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_errors(golden_dir, tmp_path, case):
    edit, message = BAD[case]
    assert message in _break(golden_dir, tmp_path, edit)


def test_pickle_only_checkpoint_is_refused(golden_dir, tmp_path):
    def edit(ckpt):
        (ckpt / "model.safetensors").unlink()
        (ckpt / "pytorch_model.bin").write_bytes(b"not unpickled")
    msg = _break(golden_dir, tmp_path, edit)
    assert "only pickle weights (pytorch_model.bin)" in msg and "never unpickles" in msg


def test_index_naming_missing_shard(golden_dir, tmp_path):
    def edit(ckpt):
        (ckpt / "model.safetensors").unlink()
        index = {"weight_map": {"model.transformer.wte.weight": "model-00001-of-00002.safetensors"}}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "names shard model-00001-of-00002.safetensors, which is missing" in _break(golden_dir, tmp_path, edit)


def test_no_weights_at_all(golden_dir, tmp_path):
    msg = _break(golden_dir, tmp_path, lambda c: (c / "model.safetensors").unlink())
    assert "no model.safetensors and no model.safetensors.index.json" in msg


def test_model_path_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such directory, and not a hub repo id"):
        resolve_model_path(str(tmp_path / "absent"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache, and it could not be downloaded"):
        resolve_model_path("GSAI-ML/LLaDA-8B-Instruct", cache_dir=str(tmp_path / "hf-cache"))


def test_hub_id_resolves_from_cache(golden_dir, tmp_path, monkeypatch):
    """A repo id found in the local Hugging Face cache loads with no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    repo = cache / "models--GSAI-ML--LLaDA-tiny"
    commit = "0" * 40
    copy_golden(golden_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    path = resolve_model_path("GSAI-ML/LLaDA-tiny", cache_dir=str(cache))
    assert path == repo / "snapshots" / commit
    assert load_model(path, "float32", "cpu").config.d_model == 64


# Loading peaks at the target weights' bytes plus a few MB: the model is
# allocated once in the target dtype and tensors arrive through a small buffer.
PEAK_LIMIT = 1.15

MEASURE = textwrap.dedent("""
    import re, sys, torch
    from pathlib import Path
    import server.models.llada  # noqa: F401  (imports done before the baseline)
    from server.models.loader import load_model

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    torch.zeros(64, 64) @ torch.zeros(64, 64)  # warm the allocator and BLAS
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    model = load_model(Path(sys.argv[1]), sys.argv[2], "cpu")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(status("VmHWM") - base, weights)
""")


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory):
    """One random ~54M-parameter model saved as float32 (214 MB) and bfloat16 (107 MB)."""
    root = tmp_path_factory.mktemp("big")
    sizes = dict(d_model=768, n_heads=12, n_kv_heads=12, n_layers=4, mlp_hidden_size=2048, vocab_size=16384,
                 mask_token_id=16383, eos_token_id=16382, pad_token_id=16382)
    return {dtype: make_random_checkpoint(root / str(dtype), dtype=dtype, **sizes)
            for dtype in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("saved,target", [(torch.float32, "bfloat16"), (torch.bfloat16, "bfloat16"),
                                          (torch.bfloat16, "float32")],
                         ids=["f32-as-bf16", "bf16-as-bf16", "bf16-as-f32"])
def test_load_peak_memory_is_the_target_weights(big_checkpoints, saved, target):
    """Peak RSS growth while loading, in a fresh interpreter, measured from
    after the imports: at most 1.15x the loaded model's weight bytes,
    whatever the checkpoint's dtype (no float32 model on the way to
    bfloat16, no tensor-sized conversion buffer)."""
    ckpt = big_checkpoints[saved]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(ckpt), target], capture_output=True, text=True,
                         env=env, check=True)
    peak, weights = map(int, out.stdout.split())
    assert weights == 53_484_288 * (2 if target == "bfloat16" else 4)  # the model really is that big
    assert peak <= PEAK_LIMIT * weights, f"loading {weights / 1e6:.0f} MB of weights peaked at {peak / 1e6:.0f} MB"


def test_streamed_safetensors_file_reads_back(tmp_path, golden_dir):
    """The streaming writer's file is what safetensors itself reads, and the
    loader loads a model written through it."""
    from server.models.writer import llada_config_dict, write_safetensors_streaming

    ref = load_model(golden_dir, "float32", "cpu")
    tensors = {name: param.data[r0:r1].to(torch.bfloat16) for name, (param, r0, r1) in ref.checkpoint_params().items()}
    specs = [(name, tuple(t.shape), t.dtype) for name, t in sorted(tensors.items())]
    out = tmp_path / "streamed"
    out.mkdir()
    made = []
    size = write_safetensors_streaming(out / "model.safetensors", specs,
                                       lambda name, shape, dtype: made.append(name) or tensors[name])
    assert made == [s[0] for s in specs] and size == (out / "model.safetensors").stat().st_size
    back = load_file(str(out / "model.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    (out / "config.json").write_text(json.dumps(llada_config_dict(ref.config)))
    model = load_model(out, "bfloat16", "cpu")
    assert torch.equal(model.blocks[1].qkv_proj.weight, ref.blocks[1].qkv_proj.weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="declared"):
        write_safetensors_streaming(out / "bad.safetensors", specs[:1], lambda *a: torch.zeros(3))


def test_card_examples_come_from_the_model_cards_widget(tmp_path):
    from server.models.loader import card_examples

    card = tmp_path / "README.md"
    assert card_examples(tmp_path) == []  # no card
    card.write_text("---\nlicense: mit\nwidget:\n- text: 'Paris is the capital of'\n- example_title: Chat\n"
                    "  messages:\n  - role: system\n    content: Be brief.\n  - role: user\n    content: hi\n"
                    "  - role: user\n    content: 'reverse: a b c'\n- example_title: empty\n  text: '  '\n"
                    "- just a string\n---\n# A model\n")
    assert card_examples(tmp_path) == [{"title": "Paris is the capital of", "prompt": "Paris is the capital of"},
                                       {"title": "Chat", "prompt": "reverse: a b c"}]
    card.write_text("---\nwidget: [unclosed\n---\n")
    assert card_examples(tmp_path) == []  # does not parse: none, the model still loads
    card.write_text("# no front matter\n---\nwidget:\n- text: x\n---\n")
    assert card_examples(tmp_path) == []
