"""A LLaDA-8B-shaped checkpoint with random bfloat16 weights, made on the
device and written to local disk tensor by tensor (no download), shared by
the gpu_check parts load_8b and decode: whichever runs first writes it.
Sizes are the real LLaDA-8B config's (DESIGN.md); --small uses toy sizes."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from server.models.llada import LLaDAConfig, LLaDAModel
from server.models.writer import llada_config_dict, write_safetensors_streaming

LLADA_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=4096, mask_token_id=126336,
                eos_token_id=126081, pad_token_id=126081)
TOY = dict(LLADA_8B, d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=192, vocab_size=512,
           mask_token_id=500, eos_token_id=501, pad_token_id=501)
STD = 0.02


def config(small: bool) -> LLaDAConfig:
    cfg = LLaDAConfig(**(TOY if small else LLADA_8B), torch_dtype="bfloat16")
    cfg.validate()
    return cfg


def specs(cfg: LLaDAConfig) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(checkpoint name, shape, dtype) of every tensor, in a fixed order."""
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    return [(name, (r1 - r0, *param.shape[1:]), torch.bfloat16)
            for name, (param, r0, r1) in sorted(model.checkpoint_params().items())]


def tensor(index: int, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Tensor ``index`` of the checkpoint, the same every time it is made:
    norms are ones, the rest N(0, 0.02^2) from a generator seeded by index."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(1000 + index)
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * STD).to(torch.bfloat16)


def ensure_checkpoint(root: Path, small: bool, device: torch.device) -> dict:
    """Writes the checkpoint under ``root`` unless a complete one is there;
    after writing, syncs it to disk and drops it from the page cache, so the
    next load reads the disk. Returns what it did and how long it took."""
    done = root / "complete"
    if done.is_file():
        return {"path": str(root), "written": False, **json.loads(done.read_text())}
    root.mkdir(parents=True, exist_ok=True)
    cfg = config(small)
    raw = llada_config_dict(cfg)
    (root / "config.json").write_text(json.dumps(raw, indent=1))
    file = root / "model.safetensors"
    t0 = time.perf_counter()
    table = specs(cfg)
    index = {name: i for i, (name, _, _) in enumerate(table)}
    size = write_safetensors_streaming(file, table, lambda name, shape, _: tensor(index[name], name, shape, device))
    t_write = time.perf_counter() - t0
    with open(file, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # this file's pages only
    info = {"bytes": size, "write_s": round(t_write, 2), "write_and_sync_s": round(time.perf_counter() - t0, 2)}
    done.write_text(json.dumps(info))
    return {"path": str(root), "written": True, **info}


def default_dir(small: bool) -> Path:
    return Path(os.environ.get("LLADA_8B_DIR", "/tmp/llada-8b-random" + ("-toy" if small else "")))
