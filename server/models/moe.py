"""Mixture-of-experts pieces shared by LLaDA-MoE and LLaDA2: the routed
experts as two stacked weights run by ``kernels.ops.fused_moe``, and the two
routers, each rounding where its reference rounds.

- ``softmax_topk`` (LLaDA-MoE, OLMoE-derived): softmax over all experts in
  float32, plus the optional expert bias, top-k of that; the weights are the
  top-k values themselves (no renormalisation: the reference block hard-codes
  ``norm_topk_prob = False``), cast to the model dtype.
- ``grouped_sigmoid_topk`` (LLaDA2, DeepSeek-V3 style): sigmoid of float32
  router logits; ``expert_bias`` only chooses (groups ranked by the sum of
  their two best biased scores, the best ``topk_group`` groups kept, top-k
  experts inside them); the weights are the unbiased scores renormalised
  (k > 1) times ``routed_scaling_factor``, kept in float32.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kernels import ops


class Experts(nn.Module):
    """``num_experts`` SwiGLU experts; expert e's gate and up projections are
    rows [0, I) and [I, 2I) of ``w_gate_up[e]``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return ops.fused_moe(x, self.w_gate_up, self.w_down, topk_ids, topk_weights)

    def checkpoint_params(self, prefix: str) -> dict[str, tuple[torch.Tensor, int, int]]:
        """``{prefix}{e}.{gate,up,down}_proj.weight`` -> rows of a 2-D view of the stacked weights."""
        n, (num, hidden, _) = self.intermediate, self.w_down.shape
        gate_up = self.w_gate_up.data.view(num * 2 * n, hidden)  # (experts * 2I, hidden)
        down = self.w_down.data.view(num * hidden, n)  # (experts * hidden, I)
        table = {}
        for e in range(num):
            table[f"{prefix}{e}.gate_proj.weight"] = (gate_up, 2 * n * e, 2 * n * e + n)
            table[f"{prefix}{e}.up_proj.weight"] = (gate_up, 2 * n * e + n, 2 * n * (e + 1))
            table[f"{prefix}{e}.down_proj.weight"] = (down, hidden * e, hidden * (e + 1))
        return table


def softmax_topk(router_logits: torch.Tensor, top_k: int,
                 expert_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: (num_tokens, num_experts) in the model dtype. Returns
    (topk_ids int64, topk_weights in the logits' dtype), each (num_tokens, top_k)."""
    probs = torch.softmax(router_logits, dim=1, dtype=torch.float32)
    if expert_bias is not None:
        probs = probs + expert_bias
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return ids, weights.to(router_logits.dtype)


def grouped_sigmoid_topk(router_logits: torch.Tensor, top_k: int, expert_bias: torch.Tensor, n_group: int,
                         topk_group: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: (num_tokens, num_experts) float32. Returns (topk_ids
    int64, topk_weights float32), each (num_tokens, top_k)."""
    num_tokens, num_experts = router_logits.shape
    scores = torch.sigmoid(router_logits)
    biased = scores + expert_bias
    group_scores = biased.view(num_tokens, n_group, -1).topk(2, dim=-1).values.sum(dim=-1)  # (tokens, n_group)
    groups = torch.topk(group_scores, topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    keep = keep[:, :, None].expand(num_tokens, n_group, num_experts // n_group).reshape(num_tokens, -1)
    ids = torch.topk(biased.masked_fill(~keep, float("-inf")), top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling
