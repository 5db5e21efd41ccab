"""Loading Hugging Face checkpoints: safetensors only, streamed.

The model is built on the meta device and each parameter allocated once, in
the target dtype on the target device. Weights are then read straight from
disk into those parameters: ``readinto`` on the parameter's own memory when it
is on the CPU in the file's dtype, else through a small reusable host buffer,
a chunk at a time, converted as each chunk is copied. So loading needs the
target weights' bytes plus a few MB, never a float32 or second copy (measured
in tests/models/test_loader.py). Pickle checkpoints
(``.bin``/``.pt``) are refused, never unpickled. Every bad checkpoint gets one
error naming the file, tensor or field.
"""
from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from server.models import registry

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names what is wrong."""


@dataclass
class TensorEntry:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file
    end: int


def resolve_model_path(model: str, cache_dir: str | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id, taken from the local
    Hugging Face cache or downloaded. Offline and not cached is an error
    saying so."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"--model {model!r} is a file; give the checkpoint's directory")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise CheckpointError(f"--model {model!r}: no such directory, and not a hub repo id (org/name)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model", "README.md"]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, cache_dir=cache_dir))
    except Exception as e:  # offline (HF_HUB_OFFLINE), unknown repo, auth
        why = f"{type(e).__name__}: {e}"
        raise CheckpointError(
            f"--model {model!r} is not a local directory and is not in the Hugging Face cache, "
            f"and it could not be downloaded ({why}). Download it where there is network "
            f"(huggingface-cli download {model}) or pass a local directory."
        ) from None


def recommended_decoding(model: str, **builtin: Any) -> dict[str, Any]:
    """``builtin`` (gen_length=..., block_length=...) overridden by what the
    checkpoint ``model`` recommends: the defaults for flags the user left out."""
    return builtin | generation_defaults(resolve_model_path(model))


def generation_defaults(path: Path) -> dict[str, Any]:
    """The decoding a checkpoint recommends, as DiffusionParams field names:
    its family's own (``registry.decoding_defaults``: LLaDA2's schedule and
    threshold, Dream's, ...) overridden by its generation_config.json
    (``max_new_tokens``, ``block_length``, and the keys its family's
    generate() reads). A present but invalid value is an error naming it.
    The server and the CLI use these where the user gives none, as vLLM
    does with a model's generation config."""
    file = path / "generation_config.json"
    generation = read_json(file) if file.is_file() else {}
    try:
        return registry.decoding_defaults(read_json(path / "config.json"), generation, str(file))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def card_examples(path: Path) -> list[dict[str, str]]:
    """Example prompts from the checkpoint's model card (README.md): the
    Hugging Face ``widget`` list of its YAML front matter, each a ``text``
    or the last user message of ``messages``, titled by ``example_title``.
    A card without one, or one that does not parse, gives none: examples
    are a nicety, never a reason to refuse a checkpoint."""
    card = path / "README.md"
    if not card.is_file():
        return []
    parts = card.read_text(errors="replace").split("---", 2)
    if len(parts) < 3 or parts[0].strip():
        return []
    import yaml  # a dependency of transformers

    try:
        widget = (yaml.safe_load(parts[1]) or {}).get("widget") or []
    except (yaml.YAMLError, AttributeError):
        return []
    examples = []
    for entry in widget if isinstance(widget, list) else []:
        if not isinstance(entry, dict):
            continue
        prompt = entry.get("text")
        if prompt is None and isinstance(entry.get("messages"), list):
            users = [m.get("content") for m in entry["messages"] if isinstance(m, dict) and m.get("role") == "user"]
            prompt = users[-1] if users else None
        if isinstance(prompt, str) and prompt.strip():
            examples.append({"title": str(entry.get("example_title") or prompt), "prompt": prompt})
    return examples


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint directory needs it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when sharded."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing from {path}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{path}: only pickle weights ({', '.join(pickles)}); llada-serve loads safetensors only "
            "and never unpickles. Convert the checkpoint to safetensors."
        )
    raise CheckpointError(f"{path}: no model.safetensors and no model.safetensors.index.json")


def read_header(file: Path) -> list[TensorEntry]:
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        size = file.stat().st_size
        if n > size - 8:
            raise CheckpointError(f"{file}: not a safetensors file (header length {n} > file size)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: not a safetensors file (unreadable header)") from None
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {meta.get('dtype')}")
        start, end = meta["data_offsets"]
        if 8 + n + end > size:
            raise CheckpointError(f"{file}: tensor {name} runs past the end of the file (truncated?)")
        entries.append(TensorEntry(name, file, _ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + start, 8 + n + end))
    return entries


class _Staging:
    """Reusable host buffers through which tensors that cannot be read in
    place travel (another dtype, or another device), a chunk at a time, so
    loading never holds a tensor-sized intermediate: the peak stays the
    target weights plus ``num * nbytes``. Two pinned buffers on CUDA, so the
    disk read of one chunk overlaps the copy of the previous one to the
    device."""

    def __init__(self, device: torch.device, nbytes: int):
        pinned = device.type == "cuda"
        self.num = 2 if pinned else 1
        self.bufs = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(self.num)]
        self.events = [torch.cuda.Event() if pinned else None for _ in range(self.num)]
        self.turn = 0

    def next(self) -> tuple[torch.Tensor, Any]:
        i = self.turn
        self.turn = (i + 1) % self.num
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy that last read this buffer is done
        return self.bufs[i], self.events[i]


def _read_exact(f, buf: torch.Tensor, entry: TensorEntry) -> None:
    if f.readinto(buf.numpy()) != buf.numel():
        raise CheckpointError(f"{entry.file}: tensor {entry.name} is truncated")


def _read_into(f, entry: TensorEntry, dest: torch.Tensor, staging: _Staging) -> None:
    """Fill ``dest`` (a parameter's rows) with the tensor's data: straight
    into it when it is a contiguous CPU tensor of the file's dtype, else
    chunk by chunk through ``staging``, converting each chunk's dtype as it
    is copied (the same rounding as converting the whole tensor)."""
    f.seek(entry.start)
    if dest.device.type == "cpu" and dest.dtype == entry.dtype and dest.is_contiguous():
        _read_exact(f, dest.view(-1).view(torch.uint8), entry)
        return
    flat = dest.view(-1) if dest.is_contiguous() else dest.reshape(-1)  # reshape: a copy, written back below
    elem = torch.empty((), dtype=entry.dtype).element_size()
    per_chunk = max(1, staging.bufs[0].numel() // elem)
    for i in range(0, flat.numel(), per_chunk):
        n = min(per_chunk, flat.numel() - i)
        buf, event = staging.next()
        raw = buf[: n * elem]
        _read_exact(f, raw, entry)
        flat[i:i + n].copy_(raw.view(entry.dtype), non_blocking=event is not None)
        if event is not None:
            event.record()
    if flat.data_ptr() != dest.data_ptr():
        dest.copy_(flat.view(dest.shape))


# Staging buffer per chunk: small on CPU, where it counts against the host
# memory the load needs; larger for the device, where bigger copies run faster.
_STAGING_BYTES = {"cpu": 4 << 20, "cuda": 64 << 20}


def load_weights(model: torch.nn.Module, files: list[Path]) -> None:
    table = model.checkpoint_params()
    entries = [e for f in files for e in read_header(f)]
    check_entries(table, entries, files)
    device = next(iter(table.values()))[0].device
    staging = _Staging(device, _STAGING_BYTES.get(device.type, 64 << 20))
    with torch.no_grad():
        for file in files:
            with open(file, "rb", buffering=0) as f:
                for e in (e for e in entries if e.file == file):
                    param, row0, row1 = table[e.name]
                    _read_into(f, e, param.data[row0:row1], staging)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last chunks are copied before the buffers go


def check_entries(table: dict[str, tuple[torch.Tensor, int, int]], entries: list[TensorEntry],
                  files: list[Path]) -> None:
    """Every tensor the model expects is in the checkpoint once, with the
    shape the config implies, and nothing else is."""
    seen: set[str] = set()
    unexpected = [e.name for e in entries if e.name not in table]
    if unexpected:
        first = next(e for e in entries if e.name in unexpected)
        raise CheckpointError(f"{first.file}: unexpected tensor {unexpected[0]}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for e in entries:
        param, row0, row1 = table[e.name]
        expected = (row1 - row0, *param.shape[1:])
        if tuple(e.shape) != expected:
            raise CheckpointError(f"{e.file}: tensor {e.name} has shape {list(e.shape)}, the config implies {list(expected)}")
        if e.name in seen:
            raise CheckpointError(f"{e.file}: tensor {e.name} appears twice in the checkpoint")
        seen.add(e.name)
    missing = sorted(set(table) - seen)
    if missing:
        raise CheckpointError(f"{files[0].parent}: missing tensor {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Layers' random initialisation turned into no-ops while the model is
    built on the meta device (as Hugging Face's ``no_init_weights`` does):
    the checkpoint overwrites every weight, and meta's ``normal_`` alone
    imports ~150 MB of Python modules (sympy, inductor) on first use."""
    saved = {name: fn for name, fn in vars(torch.nn.init).items()
             if name.endswith("_") and not name.startswith("_") and callable(fn)}

    def skip(tensor, *args, **kwargs):
        return tensor

    try:
        for name in saved:
            setattr(torch.nn.init, name, skip)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def materialize(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Gives a model built on the meta device uninitialised storage, each
    floating-point parameter and buffer allocated once, directly in ``dtype``
    on ``device`` (no float32 copy on the way). Tied tensors stay tied."""
    # id -> (meta tensor, its replacement); the meta tensor is kept so its id is not reused.
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def alloc(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            new = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
            done[id(t)] = (t, torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new)
        return done[id(t)][1]

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = alloc(p)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = alloc(b)
    return model


def pick_dtype(dtype: str, raw_config: dict[str, Any]) -> torch.dtype:
    if dtype == "auto":
        dtype = raw_config.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} asked for, but CUDA is not available")
    return torch.device(device)


def load_model(path: Path, dtype: str = "auto", device: str = "auto", parallel=None) -> torch.nn.Module:
    """Builds the model for the checkpoint at ``path`` and loads its weights;
    with ``parallel`` (``server.models.parallel.Parallel``), this rank's
    tensor-parallel shard of it, reading only that shard's weights."""
    raw = read_json(path / "config.json")
    try:
        gen_file = path / "generation_config.json"
        generation = read_json(gen_file) if gen_file.is_file() else None
        model_cls, cfg = registry.resolve(raw, str(path / "config.json"), generation)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from None
    files = checkpoint_files(path)
    torch_dtype, torch_device = pick_dtype(dtype, raw), pick_device(device)
    with torch.device("meta"), _skip_init():
        model = model_cls(cfg)
    if parallel is not None:
        from server.models.parallel import shard_and_load

        return shard_and_load(model, files, torch_dtype, torch_device, parallel).eval().requires_grad_(False)
    materialize(model, torch_dtype, torch_device)
    load_weights(model, files)
    return model.eval().requires_grad_(False)
