"""Remasking strategies, looked up by name: how confident the model is in
each masked position's prediction. The commit rule then takes the most
confident ones (see ``kernels.ops.select_commits``).

Each strategy says which per-row scores it needs from the unmask op and
turns them into one confidence per row (higher commits first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch-free at import: the API validates names without torch
    import torch


@dataclass(frozen=True)
class Remasking:
    name: str
    confidence: Callable[[dict[str, "torch.Tensor"]], "torch.Tensor"]  # unmask scores -> (num_rows,)
    needs_uniform: bool = False  # wants scores["uniform"], a per-row U[0, 1) draw


REMASKING: dict[str, Remasking] = {
    # LLaDA's default: the softmax probability of the predicted token.
    "low_confidence": Remasking("low_confidence", lambda s: s["prob"]),
    # LLaDA's baseline: commit uniformly random positions.
    "random": Remasking("random", lambda s: s["uniform"], needs_uniform=True),
}
