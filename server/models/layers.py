"""Layer pieces the model files share: RMSNorm, rotary embedding (full or
partial, computed in float32 or in the model dtype), the attention of one
layer (fused q/k/v, optional per-head q/k RMSNorm, GQA through
``kernels.ops``), the SwiGLU MLP, and the pre-norm decoder layer.

Every piece rounds where its reference rounds: RMSNorm normalises in float32
and casts back before the weight multiply (LLaDA, LLaDA-MoE, LLaDA2 and Dream
all do), and the rotary tables are float32 whatever the model dtype.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) -> out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model dtype (float64 too), as the references do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary:
    """float32 RoPE tables over the first ``rotary_dim`` dims of a head
    (partial rotary: the rest pass through), grown on demand, computed as the
    references compute them (outer product of positions and inv_freq, then
    sin/cos) over the whole table so every entry carries the same rounding.

    ``in_float32``: LLaDA rotates in float32 and casts back; the Hugging Face
    style models (LLaDA-MoE, LLaDA2, Dream) cast the tables to the model dtype
    and rotate in it (``table_dtype`` says which)."""

    def __init__(self, head_dim: int, theta: float, rotary_dim: int | None = None, in_float32: bool = True):
        self.head_dim = head_dim
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= head_dim:
            raise ValueError(f"rotary dim {self.rotary_dim} must be even and in (0, head_dim {head_dim}]")
        self.theta = theta
        self.in_float32 = in_float32
        self.sin = self.cos = None

    def table_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.in_float32 else model_dtype

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sin is None or self.sin.shape[0] < length or self.sin.device != device:
            n = max(length, 256 if self.sin is None else 2 * self.sin.shape[0])
            dim = self.rotary_dim
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim))
            seq = torch.arange(n, device=device, dtype=torch.float)
            freqs = torch.einsum("i , j -> i j", seq, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.sin, self.cos = emb.sin(), emb.cos()  # (n, rotary_dim)
        return self.sin, self.cos

    @staticmethod
    def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """x: (num_tokens, heads, head_dim); sin/cos: (num_tokens, 1, rotary_dim)
        in the dtype the rotation is computed in (NeoX rotate-half layout)."""
        rd = sin.shape[-1]
        xr = x[..., :rd].to(sin.dtype)
        x1, x2 = xr.chunk(2, dim=-1)
        out = (xr * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)
        return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)


class Attention(nn.Module):
    """One layer's attention on a ragged batch: q/k/v in one GEMM (the loader
    fills its slices), optional per-head RMSNorm of q and k before RoPE (one
    weight of head_dim shared by the heads), RoPE, ``attend`` (GQA), output
    projection."""

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool = False,
                 out_bias: bool = False, qk_norm_eps: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.qkv_proj = nn.Linear(hidden, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=out_bias)
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm, self.k_norm = RMSNorm(head_dim, qk_norm_eps), RMSNorm(head_dim, qk_norm_eps)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, attend: AttendFn,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: (num_tokens, hidden), normed. Returns (num_tokens or len(rows), hidden)."""
        h, kv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(-1, h + 2 * kv, self.head_dim)
        q, k, v = qkv[:, :h], qkv[:, h:h + kv], qkv[:, h + kv:]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = Rotary.rotate(q, sin, cos), Rotary.rotate(k, sin, cos)
        if rows is not None:
            q = q.index_select(0, rows)
        return self.o_proj(attend(q, k, v).reshape(-1, h * self.head_dim))

    def qkv_slices(self) -> dict[str, tuple[int, int]]:
        """q, k, v -> their [start, end) rows of ``qkv_proj``."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up in one GEMM."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def checkpoint_params(self, prefix: str) -> dict[str, tuple[torch.Tensor, int, int]]:
        n, w = self.intermediate, self.gate_up_proj.weight
        return {prefix + "gate_proj.weight": (w, 0, n), prefix + "up_proj.weight": (w, n, 2 * n),
                prefix + "down_proj.weight": (self.down_proj.weight, 0, self.down_proj.weight.shape[0])}


class DecoderLayer(nn.Module):
    """Pre-norm residual layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, attn: Attention, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.attn = attn
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, attend: AttendFn,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: (num_tokens, hidden). With ``rows``, every token still gives its
        key and value but only those rows query and come out."""
        h = self.attn(self.input_layernorm(x), sin, cos, attend, rows)
        if rows is not None:
            x = x.index_select(0, rows)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


def split_qkv_params(attn: Attention, prefix: str, bias: bool, out_name: str = "o_proj",
                     norm_names: tuple[str, str] = ("q_norm", "k_norm")) -> dict[str, tuple[torch.Tensor, int, int]]:
    """Checkpoint names of an attention stored as separate ``{q,k,v}_proj``
    (weights, and biases when ``bias``) -> slices of the fused projection."""
    table = {}
    for name, (r0, r1) in attn.qkv_slices().items():
        table[f"{prefix}{name}_proj.weight"] = (attn.qkv_proj.weight, r0, r1)
        if bias:
            table[f"{prefix}{name}_proj.bias"] = (attn.qkv_proj.bias, r0, r1)
    table.update(whole_params(prefix + out_name, attn.o_proj))
    if attn.q_norm is not None:
        table.update(whole_params(prefix + norm_names[0], attn.q_norm))
        table.update(whole_params(prefix + norm_names[1], attn.k_norm))
    return table


def whole_params(prefix: str, module: nn.Module) -> dict[str, tuple[torch.Tensor, int, int]]:
    """``{prefix}.weight`` (and ``.bias``) of a module, whole."""
    return {f"{prefix}.{n}": (p, 0, p.shape[0]) for n, p in module.named_parameters(recurse=False)}
