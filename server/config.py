"""Configuration dataclasses, validated once in ``__post_init__`` and built
only at the CLI (``server/__main__.py``) or by the offline ``LLM`` class."""
from __future__ import annotations

from dataclasses import dataclass

from server.engine.scheduler import SchedulerConfig

__all__ = ["ModelConfig", "SchedulerConfig"]

_DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")


@dataclass
class ModelConfig:
    model: str  # a local checkpoint directory or a hub repo id
    dtype: str = "auto"  # auto = the checkpoint's torch_dtype
    device: str = "auto"  # auto = cuda if available, else cpu
    max_model_len: int | None = None  # prompt + canvas; None = the config's max_sequence_length

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
