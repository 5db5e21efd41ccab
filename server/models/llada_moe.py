"""LLaDA-MoE (``architectures: ["LLaDAMoEModelLM"]``, e.g.
inclusionAI/LLaDA-MoE-7B-A1B): a bidirectional OLMoE-style mask predictor.

Matches the Hub remote code (``modeling_lladamoe.py``) numerically:
q/k/v/o projections (optional biases), per-head q/k RMSNorm before RoPE,
partial RoPE (``partial_rotary_factor``) with float32 tables cast to the
model dtype, attention softmax in float32 even in a float64 model (the eager
reference), dense SwiGLU layers where ``moe_layer_freq`` is 0 and routed
experts elsewhere (``server.models.moe.softmax_topk``: no renormalisation),
an optional shared expert added to the routed output. Position i predicts
token i. Mask id from generation_config.json (not in the hub config.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from server.models.base import DecoderLM, config_from_dict
from server.models.layers import Attention, DecoderLayer, GatedMLP, Rotary, split_qkv_params, whole_params
from server.models.moe import Experts, softmax_topk


@dataclass
class LLaDAMoEConfig:
    """The fields of a LLaDA-MoE ``config.json`` this implementation reads."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_size: int
    dense_intermediate_size: int
    expert_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_layer_freq: list[int]
    mask_token_id: int
    num_key_value_heads: int | None = None
    shared_expert_intermediate_size: int | None = None
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    qk_layernorm: bool = False
    moe_router_enable_expert_bias: bool = False
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "dense_intermediate_size",
                "expert_intermediate_size", "num_experts", "num_experts_per_tok", "moe_layer_freq")
    UNSUPPORTED = {"clip_qkv": None, "rope_scaling": None, "hidden_act": "silu", "moe_router_score_function": "softmax"}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json",
                  generation: dict[str, Any] | None = None) -> "LLaDAMoEConfig":
        return config_from_dict(cls, raw, source, "LLaDAMoEModelLM", cls.REQUIRED, generation, cls.UNSUPPORTED)

    def validate(self, source: str = "config.json") -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.partial_rotary_factor is None or self.partial_rotary_factor <= 0:
            self.partial_rotary_factor = 1.0
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{source}: hidden_size {self.hidden_size}, num_attention_heads "
                             f"{self.num_attention_heads} and num_key_value_heads {self.num_key_value_heads} "
                             "do not divide evenly")
        if not isinstance(self.moe_layer_freq, list) or len(self.moe_layer_freq) != self.num_hidden_layers:
            raise ValueError(f"{source}: moe_layer_freq must list 0 (dense) or 1 (MoE) for each of the "
                             f"{self.num_hidden_layers} layers, got {self.moe_layer_freq!r}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"{source}: num_experts_per_tok {self.num_experts_per_tok} not in [1, num_experts]")

    # The names the engine and runner read, shared by every model config.
    n_layers = property(lambda self: self.num_hidden_layers)
    n_kv_heads = property(lambda self: self.num_key_value_heads)
    head_dim = property(lambda self: self.hidden_size // self.num_attention_heads)
    embedding_size = property(lambda self: self.vocab_size)
    max_sequence_length = property(lambda self: self.max_position_embeddings)
    block_causal_size = 0


class LLaDAMoEBlock(nn.Module):
    """Routed experts (softmax top-k) plus the optional shared expert."""

    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size)
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.moe_router_enable_expert_bias else None
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = softmax_topk(self.gate(x), self.top_k, self.expert_bias)
        out = self.experts(x, ids, weights)
        return out if self.shared_expert is None else out + self.shared_expert(x)


class LLaDAMoEModel(DecoderLM):
    static_step = False  # expert routing groups tokens by counts read on the host
    attention_softmax_dtype = torch.float32  # the eager reference's, also in a float64 model

    def __init__(self, cfg: LLaDAMoEConfig):
        heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        layers = []
        for i in range(cfg.num_hidden_layers):
            attn = Attention(cfg.hidden_size, heads, kv, hd, cfg.attention_bias, cfg.attention_bias,
                             cfg.rms_norm_eps if cfg.qk_layernorm else None)
            mlp = LLaDAMoEBlock(cfg) if cfg.moe_layer_freq[i] else GatedMLP(cfg.hidden_size, cfg.dense_intermediate_size)
            layers.append(DecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps))
        rotary = Rotary(hd, cfg.rope_theta, int(hd * cfg.partial_rotary_factor), in_float32=False)
        super().__init__(cfg, layers, cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.tie_word_embeddings,
                         rotary)

    def checkpoint_params(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """Checkpoint tensor name -> (parameter, start row, end row)."""
        table = self.outer_params("model.embed_tokens.weight", "model.norm.weight")
        for i, layer in enumerate(self.decoder_layers):
            p = f"model.layers.{i}."
            table.update(whole_params(p + "input_layernorm", layer.input_layernorm))
            table.update(whole_params(p + "post_attention_layernorm", layer.post_attention_layernorm))
            table.update(split_qkv_params(layer.attn, p + "self_attn.", self.config.attention_bias))
            mlp = layer.mlp
            if isinstance(mlp, GatedMLP):
                table.update(mlp.checkpoint_params(p + "mlp."))
                continue
            table.update(whole_params(p + "mlp.gate", mlp.gate))
            table.update(mlp.experts.checkpoint_params(p + "mlp.experts."))
            if mlp.expert_bias is not None:
                table[p + "mlp.expert_bias"] = (mlp.expert_bias, 0, mlp.expert_bias.shape[0])
            if mlp.shared_expert is not None:
                table.update(mlp.shared_expert.checkpoint_params(p + "shared_expert."))
        return table
