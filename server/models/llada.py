"""LLaDA (``architectures: ["LLaDAModelLM"]``), a native PyTorch mask predictor.

Matches GSAI-ML's reference modeling code numerically: RMSNorm normalises in
float32 and casts back before the weight multiply; RoPE (NeoX rotate-half)
rotates q and k in float32 with float32 tables, for every model dtype; the
MLP is ``ff_out(silu(ff_proj(x)) * up_proj(x))``; no causal mask, no logit
scaling, position i predicts token i. The forward passes (ragged and
dense) are ``server.models.base.RaggedLM``'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from server.models.base import RaggedLM
from server.models.layers import AttendFn, RMSNorm, Rotary


@dataclass
class LLaDAConfig:
    """The fields of a LLaDA ``config.json`` this implementation reads."""

    d_model: int
    n_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    mask_token_id: int
    n_kv_heads: int | None = None
    embedding_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    weight_tying: bool = False
    # > 0: block-causal attention (LLaDA2-style: causal across blocks of this
    # many positions, bidirectional inside), for which the prefix cache is exact.
    block_causal_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # Reference features this implementation does not have: refuse rather than
    # silently compute something else.
    _UNSUPPORTED = {
        "alibi": False, "include_bias": False, "include_qkv_bias": False,
        "attention_layer_norm": False, "scale_logits": False, "input_emb_norm": False,
        "rope": True, "block_type": "llama", "layer_norm_type": "rms",
        "activation_type": "silu", "multi_query_attention": None,
    }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json",
                  generation: dict[str, Any] | None = None) -> "LLaDAConfig":
        missing = [k for k in ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size") if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)} for LLaDAModelLM")
        for key, supported in cls._UNSUPPORTED.items():
            if key in raw and raw[key] != supported and not (supported is None and raw[key] is False):
                raise ValueError(f"{source}: {key}={raw[key]!r} is not supported (only {supported!r})")
        merged = dict(raw)  # ids config.json lacks come from generation_config.json, else it is an error
        for key in ("mask_token_id", "eos_token_id"):
            if merged.get(key) is None and (generation or {}).get(key) is not None:
                merged[key] = generation[key]
        if merged.get("mask_token_id") is None:
            raise ValueError(f"{source}: no mask_token_id in config.json or generation_config.json")
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        cfg = cls(**{k: v for k, v in merged.items() if k in names and not k.startswith("_")},
                  extra={k: v for k, v in raw.items() if k not in names})
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config.json") -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.d_model % self.n_heads:
            raise ValueError(f"{source}: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{source}: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"{source}: head dim {self.d_model // self.n_heads} must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"{source}: embedding_size {self.embedding_size} < vocab_size {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class LLaDABlock(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        # q, k, v fused into one GEMM; the loader fills the three slices.
        self.qkv_proj = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=False)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        # ff_proj (gate) and up_proj fused likewise.
        self.gate_up_proj = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, attend: AttendFn,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: (num_tokens, d_model). With ``rows``, every token still gives
        its key and value but only those rows query, and only they come out:
        (len(rows), d_model)."""
        q_dim = self.n_heads * self.head_dim
        qkv = self.qkv_proj(self.attn_norm(x)).view(-1, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk = Rotary.rotate(qkv[:, : self.n_heads + self.n_kv_heads], sin, cos)  # q and k heads in one pass
        q, k, v = qk[:, : self.n_heads], qk[:, self.n_heads:], qkv[:, self.n_heads + self.n_kv_heads:]
        if rows is not None:
            q, x = q.index_select(0, rows), x.index_select(0, rows)
        x = x + self.attn_out(attend(q, k, v).reshape(-1, q_dim))
        gate, up = self.gate_up_proj(self.ff_norm(x)).chunk(2, dim=-1)
        return x + self.ff_out(F.silu(gate) * up)


class LLaDAModel(RaggedLM):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_out = None if cfg.weight_tying else nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        if cfg.block_causal_size:
            self.decoding_modes = ("exact", "prefix_cache")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    @property
    def layers(self) -> nn.ModuleList:
        return self.blocks

    def head(self, x: torch.Tensor) -> torch.Tensor:
        head = self.wte.weight if self.ff_out is None else self.ff_out.weight
        return F.linear(self.ln_f(x), head)

    # -- weights -------------------------------------------------------------
    def checkpoint_params(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """Checkpoint tensor name -> (parameter, start row, end row): where
        each tensor of a Hugging Face LLaDA checkpoint goes in this model."""
        cfg = self.config
        q_dim, kv_dim, hidden = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.mlp_hidden_size
        p = "model.transformer."
        table: dict[str, tuple[torch.Tensor, int, int]] = {}

        def whole(name: str, param: torch.Tensor) -> None:
            table[name] = (param, 0, param.shape[0])

        whole(p + "wte.weight", self.wte.weight)
        whole(p + "ln_f.weight", self.ln_f.weight)
        if self.ff_out is not None:
            whole(p + "ff_out.weight", self.ff_out.weight)
        for i, b in enumerate(self.blocks):
            bp = f"{p}blocks.{i}."
            whole(bp + "attn_norm.weight", b.attn_norm.weight)
            whole(bp + "ff_norm.weight", b.ff_norm.weight)
            whole(bp + "attn_out.weight", b.attn_out.weight)
            whole(bp + "ff_out.weight", b.ff_out.weight)
            table[bp + "q_proj.weight"] = (b.qkv_proj.weight, 0, q_dim)
            table[bp + "k_proj.weight"] = (b.qkv_proj.weight, q_dim, q_dim + kv_dim)
            table[bp + "v_proj.weight"] = (b.qkv_proj.weight, q_dim + kv_dim, q_dim + 2 * kv_dim)
            table[bp + "ff_proj.weight"] = (b.gate_up_proj.weight, 0, hidden)
            table[bp + "up_proj.weight"] = (b.gate_up_proj.weight, hidden, 2 * hidden)
        return table

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights (tests, benchmarks, training from scratch)."""
        g = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight") or name == "ln_f.weight":
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=g) * std)
