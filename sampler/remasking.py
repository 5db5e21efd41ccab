"""Remasking strategies, looked up by name: how confident the model is in
each masked position's prediction (higher commits first), and the rule that
decides how many to commit:
- ``quota``: the step's share of the block (the reference's rule; fixed steps);
- ``threshold``: every position with confidence >= ``threshold``, at least
  the most confident one (parallel decoding: steps adapt to the model);
- ``factor``: Fast-dLLM's rule, the top n while the n-th confidence c_n >=
  1 - factor / (n + 1), at least one (steps adapt too);
- ``threshold_quota``: LLaDA2's rule, every position with confidence >
  ``threshold`` when there are at least the step's quota of them, else the
  quota most confident (the schedule still bounds the steps);
- ``bernoulli``: Dream's ``origin``, each masked position independently with
  the step's transfer probability (its schedule's 1 - s/t).

Dream's ``alg`` names are accepted as aliases (``maskgit_plus`` =
``low_confidence``, ``topk_margin`` = ``margin``, ``entropy``, ``origin``).

Each strategy names the per-row scores it needs from the unmask op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch-free at import: the API validates names without torch
    import torch


@dataclass(frozen=True)
class Remasking:
    confidence: Callable[[dict[str, "torch.Tensor"]], "torch.Tensor"]  # unmask scores -> (num_rows,)
    rule: str = "quota"  # quota | threshold | factor | threshold_quota | bernoulli
    needs_uniform: bool = False  # wants scores["uniform"], a per-row U[0, 1) draw
    needs_margin: bool = False  # wants scores["margin"]
    needs_entropy: bool = False  # wants scores["entropy"]

    @property
    def is_adaptive(self) -> bool:
        """Whether the number of steps follows the model (not the schedule)."""
        return self.rule in ("threshold", "factor")


def _prob(s):
    return s["prob"]


REMASKING: dict[str, Remasking] = {
    # LLaDA's default: the softmax probability of the predicted token.
    "low_confidence": Remasking(_prob),
    # LLaDA's baseline: commit uniformly random positions.
    "random": Remasking(lambda s: s["uniform"], needs_uniform=True),
    # Dream's alternatives: top-1 minus top-2 probability; negative entropy.
    "margin": Remasking(lambda s: s["margin"], needs_margin=True),
    "entropy": Remasking(lambda s: -s["entropy"], needs_entropy=True),
    # Parallel decoding (Fast-dLLM) on the low-confidence score.
    "threshold": Remasking(_prob, rule="threshold"),
    "factor": Remasking(_prob, rule="factor"),
    # LLaDA2.x's generate(): threshold commits with the top-k fallback.
    "threshold_quota": Remasking(_prob, rule="threshold_quota"),
    # Dream's "origin": a coin per masked position (the uniform is the coin).
    "origin": Remasking(lambda s: s["uniform"], rule="bernoulli", needs_uniform=True),
}
REMASKING["maskgit_plus"] = REMASKING["low_confidence"]
REMASKING["topk_margin"] = REMASKING["margin"]
