"""LLaDA (``architectures: ["LLaDAModelLM"]``), a native PyTorch mask predictor.

Matches GSAI-ML's reference modeling code numerically: RMSNorm normalises in
float32 and casts back before the weight multiply; RoPE (NeoX rotate-half)
rotates q and k in float32 with float32 tables, for every model dtype; the
MLP is ``ff_out(silu(ff_proj(x)) * up_proj(x))``; no causal mask, no logit
scaling, position i predicts token i.

Two entry points share the layers:
- ``forward``: a ragged (packed) batch, one row per token, sequences given by
  ``cu_seqlens``; the LM head runs only on ``logits_indices``, and with
  ``logits_cu_seqlens`` so does the last layer (every token still gives it
  its key and value). The engine's path.
- ``forward_dense``: a (batch, length) tensor with an optional padding
  ``attention_mask``, positions numbered from 0 in every row, padded keys
  masked: exactly the reference's call signature, used by the reference
  sampler and the parity tests.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import ops
from server.models.kv_cache import CacheView


@dataclass
class LLaDAConfig:
    """The fields of a LLaDA ``config.json`` this implementation reads."""

    d_model: int
    n_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    n_kv_heads: int | None = None
    embedding_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = 126336
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
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
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "LLaDAConfig":
        missing = [k for k in ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size") if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)} for LLaDAModelLM")
        for key, supported in cls._UNSUPPORTED.items():
            if key in raw and raw[key] != supported and not (supported is None and raw[key] is False):
                raise ValueError(f"{source}: {key}={raw[key]!r} is not supported (only {supported!r})")
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        cfg = cls(**{k: v for k, v in raw.items() if k in names and not k.startswith("_")},
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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model dtype (float64 too), as the reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary:
    """float32 RoPE tables, grown on demand, computed exactly as the
    reference computes them (outer product of arange and inv_freq, then
    sin/cos over the whole table) so every entry carries the same rounding."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self.sin = self.cos = None

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sin is None or self.sin.shape[0] < length or self.sin.device != device:
            n = max(length, 256 if self.sin is None else 2 * self.sin.shape[0])
            dim = self.head_dim
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim))
            seq = torch.arange(n, device=device, dtype=torch.float)
            freqs = torch.einsum("i , j -> i j", seq, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.sin, self.cos = emb.sin(), emb.cos()  # (n, head_dim)
        return self.sin, self.cos

    @staticmethod
    def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        # x: (num_tokens, heads, head_dim); sin/cos: (num_tokens, 1, head_dim), float32
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) -> out


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


class LLaDAModel(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_out = None if cfg.weight_tying else nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
             logits_indices: torch.Tensor | None, rows_attend: AttendFn | None = None) -> torch.Tensor:
        """With ``rows_attend`` (attention whose queries are the
        ``logits_indices`` rows only, which must then be given), the last
        layer runs its queries, output projection and MLP on those rows
        alone: nothing after it reads the other tokens' states."""
        sin, cos = self.rotary.tables(int(positions.max()) + 1, input_ids.device)
        sin, cos = sin.index_select(0, positions)[:, None, :], cos.index_select(0, positions)[:, None, :]
        x = self.wte(input_ids)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i == last and rows_attend is not None:
                x = block(x, sin, cos, functools.partial(rows_attend, i), rows=logits_indices)
                logits_indices = None
            else:
                x = block(x, sin, cos, functools.partial(attend, i))
        if logits_indices is not None:
            x = x.index_select(0, logits_indices)  # the LM head only where the sampler needs logits
        x = self.ln_f(x)
        head = self.wte.weight if self.ff_out is None else self.ff_out.weight
        return F.linear(x, head)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: list[int],
                logits_indices: torch.Tensor | None = None, cache: CacheView | None = None,
                logits_cu_seqlens: list[int] | None = None) -> torch.Tensor:
        """input_ids, positions: (num_tokens,) packed sequences, sequence i
        spanning [cu_seqlens[i], cu_seqlens[i+1]). With ``cache``, tokens
        with a write slot store their keys/values, and sequence i's queries
        also attend to its first ``cache.cache_seqlens[i]`` cached keys.
        ``logits_cu_seqlens`` (optional) says that ``logits_indices`` is
        ascending with sequence i's rows at [logits_cu_seqlens[i],
        logits_cu_seqlens[i+1]); the last layer then computes those rows only.
        Returns logits (len(logits_indices) or num_tokens, embedding_size)."""
        causal = {}
        if self.config.block_causal_size:
            causal = {"causal_block": self.config.block_causal_size, "positions": positions}
        if cache is None:
            def attend(layer, q, k, v, cu_q=cu_seqlens):
                return ops.varlen_attention(q, k, v, cu_q, cu_seqlens, **causal)
        else:
            def attend(layer, q, k, v, cu_q=cu_seqlens):
                cache.write(layer, k, v)
                return ops.varlen_attention(q, k, v, cu_q, cu_seqlens, k_cache=cache.cache.k[layer],
                                            v_cache=cache.cache.v[layer], block_table=cache.block_table,
                                            cache_seqlens=cache.cache_seqlens, **causal)

        rows_attend = None
        if logits_cu_seqlens is not None:
            if logits_indices is None or len(logits_cu_seqlens) != len(cu_seqlens) \
                    or logits_cu_seqlens[-1] != logits_indices.numel():
                raise ValueError("logits_cu_seqlens must give each sequence's share of logits_indices")
            if not causal:  # block-causal attention takes the queries' positions from the keys': every row
                rows_attend = functools.partial(attend, cu_q=logits_cu_seqlens)
        return self._run(input_ids, positions, attend, logits_indices, rows_attend)

    def forward_dense(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      logits_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The reference's interface: (batch, length) -> (batch, length, vocab).
        Padded keys (attention_mask == 0) are masked for every query. With a
        boolean ``logits_mask`` (batch, length), the LM head runs only on its
        true positions and the result is (num_true, vocab) in row-major order
        (training computes the loss on masked tokens only)."""
        batch, length = input_ids.shape
        bias = None
        if attention_mask is not None and not bool(attention_mask.all()):
            bias = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, length) keys kept
        if self.config.block_causal_size:
            blocks = torch.arange(length, device=input_ids.device) // self.config.block_causal_size
            causal = blocks[None, :] <= blocks[:, None]  # (length, length) query -> keys seen
            bias = causal[None, None] if bias is None else bias & causal[None, None]
        positions = torch.arange(length, device=input_ids.device).repeat(batch)

        def attend(layer, q, k, v):
            q, k, v = (t.view(batch, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
            if k.shape[1] != q.shape[1]:
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return o.transpose(1, 2).reshape(batch * length, q.shape[1], q.shape[3])

        rows = None if logits_mask is None else logits_mask.reshape(-1).nonzero().squeeze(1)
        logits = self._run(input_ids.reshape(-1), positions, attend, rows)
        return logits if rows is not None else logits.view(batch, length, -1)

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
