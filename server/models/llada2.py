"""LLaDA2.x (``architectures: ["LLaDA2MoeModelLM"]``: LLaDA2.0-mini/-flash,
LLaDA2.1): a block-causal MoE mask predictor.

Matches the Hub remote code (``modeling_llada2_moe.py``) numerically: fused
``query_key_value`` (q heads, then k, then v), per-head q/k RMSNorm before
RoPE, partial RoPE (``partial_rotary_factor``, 0.5 on the hub) with float32
tables cast to the model dtype, the first ``first_k_dense_replace`` layers
dense and the rest routed by ``server.models.moe.grouped_sigmoid_topk``
(float32 router, weights combined in float32) plus a shared expert. Attention
is block-causal: a query sees the keys of its own block and of every block
before it, blocks counted from position 0. The block length is the
decoding's: each sequence's own (``block_lengths``), else the checkpoint's
default (``block_length`` of generation_config.json, 32 without one).
Position i predicts token i. Mask id from generation_config.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from server.models.base import DecoderLM, config_from_dict
from server.models.layers import Attention, DecoderLayer, GatedMLP, Rotary, whole_params
from server.models.moe import Experts, grouped_sigmoid_topk

DEFAULT_BLOCK_LENGTH = 32  # the LLaDA2 reference generate()'s default


@dataclass
class LLaDA2Config:
    """The fields of a LLaDA2 ``config.json`` this implementation reads."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    mask_token_id: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_shared_experts: int | None = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-6
    use_qk_norm: bool = True
    use_qkv_bias: bool = False
    use_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 16384
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    block_length: int = DEFAULT_BLOCK_LENGTH  # from generation_config.json when it has one

    REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
                "moe_intermediate_size", "num_experts", "num_experts_per_tok")
    UNSUPPORTED = {"rope_scaling": None, "hidden_act": "silu", "norm_head": False}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json",
                  generation: dict[str, Any] | None = None) -> "LLaDA2Config":
        raw = dict(raw)
        if (generation or {}).get("block_length") is not None:
            raw["block_length"] = generation["block_length"]
        return config_from_dict(cls, raw, source, "LLaDA2MoeModelLM", cls.REQUIRED, generation, cls.UNSUPPORTED)

    def validate(self, source: str = "config.json") -> None:
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{source}: num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.num_experts % self.n_group or self.num_experts // self.n_group < 2:
            raise ValueError(f"{source}: num_experts {self.num_experts} must split into n_group {self.n_group} "
                             "groups of at least 2")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"{source}: topk_group {self.topk_group} not in [1, n_group {self.n_group}]")
        if not 1 <= self.num_experts_per_tok <= self.topk_group * self.num_experts // self.n_group:
            raise ValueError(f"{source}: num_experts_per_tok {self.num_experts_per_tok} exceeds the experts "
                             "of the kept groups")
        if not isinstance(self.block_length, int) or self.block_length < 1:
            raise ValueError(f"{source}: block_length must be a positive integer, got {self.block_length!r}")

    n_layers = property(lambda self: self.num_hidden_layers)
    n_kv_heads = property(lambda self: self.num_key_value_heads)
    embedding_size = property(lambda self: self.vocab_size)
    max_sequence_length = property(lambda self: self.max_position_embeddings)
    block_causal_size = property(lambda self: self.block_length)


class LLaDA2MoEBlock(nn.Module):
    """Routed experts (grouped sigmoid top-k) plus the shared experts."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts))
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = None
        if cfg.num_shared_experts:
            self.shared_experts = GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        logits = nn.functional.linear(x.float(), self.gate.weight.float())  # (tokens, experts) float32
        ids, weights = grouped_sigmoid_topk(logits, c.num_experts_per_tok, self.expert_bias, c.n_group,
                                            c.topk_group, c.routed_scaling_factor)
        out = self.experts(x, ids, weights)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class LLaDA2Model(DecoderLM):
    static_step = False  # expert routing groups tokens by counts read on the host
    decoding_modes = ("exact", "prefix_cache")  # block-causal: the prefix cache is exact, nothing else needed

    def __init__(self, cfg: LLaDA2Config):
        heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        layers = []
        for i in range(cfg.num_hidden_layers):
            attn = Attention(cfg.hidden_size, heads, kv, hd, cfg.use_qkv_bias, cfg.use_bias,
                             cfg.rms_norm_eps if cfg.use_qk_norm else None)
            dense = i < cfg.first_k_dense_replace
            mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size) if dense else LLaDA2MoEBlock(cfg)
            layers.append(DecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps))
        rotary = Rotary(hd, cfg.rope_theta, int(hd * cfg.partial_rotary_factor), in_float32=False)
        super().__init__(cfg, layers, cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.tie_word_embeddings,
                         rotary)

    def checkpoint_params(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """Checkpoint tensor name -> (parameter, start row, end row)."""
        table = self.outer_params("model.word_embeddings.weight", "model.norm.weight")
        for i, layer in enumerate(self.decoder_layers):
            p = f"model.layers.{i}."
            table.update(whole_params(p + "input_layernorm", layer.input_layernorm))
            table.update(whole_params(p + "post_attention_layernorm", layer.post_attention_layernorm))
            attn = layer.attn
            table.update(whole_params(p + "attention.query_key_value", attn.qkv_proj))
            table.update(whole_params(p + "attention.dense", attn.o_proj))
            if attn.q_norm is not None:
                table.update(whole_params(p + "attention.query_layernorm", attn.q_norm))
                table.update(whole_params(p + "attention.key_layernorm", attn.k_norm))
            mlp = layer.mlp
            if isinstance(mlp, GatedMLP):
                table.update(mlp.checkpoint_params(p + "mlp."))
                continue
            table.update(whole_params(p + "mlp.gate", mlp.gate))
            table[p + "mlp.gate.expert_bias"] = (mlp.expert_bias, 0, mlp.expert_bias.shape[0])
            table.update(mlp.experts.checkpoint_params(p + "mlp.experts."))
            if mlp.shared_experts is not None:
                table.update(mlp.shared_experts.checkpoint_params(p + "mlp.shared_experts."))
        return table
