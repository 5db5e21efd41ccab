"""Writing a model as a Hugging Face LLaDA checkpoint directory (the format
the loader reads): ``config.json`` with LLaDA's field names and
``model.safetensors`` (or shards plus ``model.safetensors.index.json``)
under the real checkpoint's tensor names, fused weights split back.
Used by the demo-model training script, tests and benchmarks.
``write_safetensors_streaming`` writes a file tensor by tensor, for
checkpoints larger than host memory (the GPU check's LLaDA-8B-sized one)."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


# The fields of LLaDA-8B's config.json that describe what this implementation
# computes (the sizes come from the model's LLaDAConfig). No auto_map: the
# remote modeling code is never shipped or needed.
LLADA_FIELDS = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "alibi": False,
    "alibi_bias_max": 8.0, "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False, "block_group_size": 1,
    "block_type": "llama", "embedding_dropout": 0.0, "flash_attention": False, "include_bias": False,
    "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell",
    "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "multi_query_attention": None, "precision": "amp_bf16", "residual_dropout": 0.0, "rope": True,
    "rope_full_precision": True, "scale_logits": False, "use_cache": False,
}


def llada_config_dict(cfg) -> dict:
    raw = dict(LLADA_FIELDS)
    raw.update({k: v for k, v in asdict(cfg).items() if k != "extra"})
    raw.update(cfg.extra)
    if not raw.get("block_causal_size"):
        raw.pop("block_causal_size", None)  # not a LLaDA field; only block-causal models carry it
    raw["mlp_ratio"] = round(cfg.mlp_hidden_size / cfg.d_model, 2)
    return raw


def save_checkpoint(model: torch.nn.Module, out: Path, num_shards: int = 1, dtype: torch.dtype | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.dtype
    tensors = {name: param.data[r0:r1].detach().to("cpu", dtype).contiguous()
               for name, (param, r0, r1) in model.checkpoint_params().items()}
    raw = llada_config_dict(model.config)
    raw["torch_dtype"] = _DTYPE_NAMES[dtype]
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    names = sorted(tensors)
    if num_shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i in range(num_shards):
        shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[i::num_shards]
        save_file({n: tensors[n] for n in part}, str(out / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors_streaming(path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                                make: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]) -> int:
    """Writes a safetensors file one tensor at a time: ``make(name, shape,
    dtype)`` produces each tensor (on any device) only when its turn comes,
    so a checkpoint far larger than host memory can be written (a random
    LLaDA-8B-sized one on a GPU machine). Returns the bytes written."""
    offsets, header, pos = [], {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in specs:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append(n)
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, shape, dtype), n in zip(specs, offsets):
            t = make(name, shape, dtype)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: made {tuple(t.shape)} {t.dtype}, declared {tuple(shape)} {dtype}")
            data = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
            assert data.nbytes == n
            f.write(memoryview(data))
    return 8 + len(raw) + pos
