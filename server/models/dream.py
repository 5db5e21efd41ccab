"""Dream (``architectures: ["DreamModel"]``: Dream-v0-Base/-Instruct-7B), a
Qwen2-layout mask predictor with shifted logits.

Matches the Hub remote code (``modeling_dream.py``) numerically: q/k/v
projections with biases, o_proj without, GQA, full RoPE with float32 tables
cast to the model dtype, bidirectional attention, SwiGLU MLP. The network's
output at position i predicts the token at i + 1; Dream's sampler shifts it
(the token at i is read from the output at i - 1; position 0 keeps its own),
and so does this class, so its logits are aligned like every other model's.
Mask id from config.json (``mask_token_id``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.models.base import DecoderLM, config_from_dict
from server.models.kv_cache import CacheView
from server.models.layers import Attention, DecoderLayer, GatedMLP, Rotary, split_qkv_params, whole_params


@dataclass
class DreamConfig:
    """The fields of a Dream ``config.json`` this implementation reads."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_size: int
    intermediate_size: int
    mask_token_id: int
    num_key_value_heads: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
    UNSUPPORTED = {"rope_scaling": None, "hidden_act": "silu", "use_sliding_window": False}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json",
                  generation: dict[str, Any] | None = None) -> "DreamConfig":
        return config_from_dict(cls, raw, source, "DreamModel", cls.REQUIRED, generation, cls.UNSUPPORTED)

    def validate(self, source: str = "config.json") -> None:
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{source}: hidden_size {self.hidden_size}, num_attention_heads "
                             f"{self.num_attention_heads} and num_key_value_heads {self.num_key_value_heads} "
                             "do not divide evenly")

    n_layers = property(lambda self: self.num_hidden_layers)
    n_kv_heads = property(lambda self: self.num_key_value_heads)
    head_dim = property(lambda self: self.hidden_size // self.num_attention_heads)
    embedding_size = property(lambda self: self.vocab_size)
    max_sequence_length = property(lambda self: self.max_position_embeddings)
    block_causal_size = 0


class DreamModel(DecoderLM):
    static_step = False  # its forward shifts the logits; it has no cache modes anyway
    # The shifted logits of a block's first position come from the position
    # before it, which the cache modes do not recompute.
    decoding_modes = ("exact",)

    def __init__(self, cfg: DreamConfig):
        hd = cfg.head_dim
        layers = [DecoderLayer(Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, hd,
                                         qkv_bias=True),
                               GatedMLP(cfg.hidden_size, cfg.intermediate_size), cfg.hidden_size, cfg.rms_norm_eps)
                  for _ in range(cfg.num_hidden_layers)]
        super().__init__(cfg, layers, cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.tie_word_embeddings,
                         Rotary(hd, cfg.rope_theta, in_float32=False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: list[int],
                logits_indices: torch.Tensor | None = None, cache: CacheView | None = None,
                logits_cu_seqlens: list[int] | None = None) -> torch.Tensor:
        """``RaggedLM.forward`` with the logits shifted: row r (token index
        t) reads the network's output at t - 1, or at t for the first token
        of its sequence."""
        starts = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        starts[torch.tensor(cu_seqlens[:-1], dtype=torch.long, device=input_ids.device)] = True
        rows = torch.arange(input_ids.shape[0], device=input_ids.device) if logits_indices is None else logits_indices
        shifted = torch.where(starts[rows], rows, rows - 1)  # still ascending: the last layer's short path holds
        return super().forward(input_ids, positions, cu_seqlens, shifted, cache, logits_cu_seqlens)

    def forward_dense(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      logits_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, length) -> (batch, length, vocab), shifted as the Dream
        sampler shifts (position 0 keeps its own output)."""
        logits = super().forward_dense(input_ids, attention_mask)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits if logits_mask is None else logits[logits_mask]

    def checkpoint_params(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """Checkpoint tensor name -> (parameter, start row, end row)."""
        table = self.outer_params("model.embed_tokens.weight", "model.norm.weight")
        for i, layer in enumerate(self.decoder_layers):
            p = f"model.layers.{i}."
            table.update(whole_params(p + "input_layernorm", layer.input_layernorm))
            table.update(whole_params(p + "post_attention_layernorm", layer.post_attention_layernorm))
            table.update(split_qkv_params(layer.attn, p + "self_attn.", bias=True))
            table.update(layer.mlp.checkpoint_params(p + "mlp."))
        return table
