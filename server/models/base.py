"""The forward passes every model class shares, so the engine never
branches on the architecture.

A model class subclasses ``RaggedLM`` and provides ``embed`` (ids ->
hidden), ``layers`` (each ``layer(x, sin, cos, attend, rows=None)``),
``head`` (final norm + LM head) and a ``rotary``; its ``config`` has
``block_causal_size`` (0 = bidirectional). Two entry points:

- ``forward``: a ragged (packed) batch, one row per token, sequences given by
  ``cu_seqlens``; the LM head runs only on ``logits_indices``, and with
  ``logits_cu_seqlens`` so does the last layer (every token still gives it
  its key and value). The engine's path.
- ``forward_dense``: a (batch, length) tensor with an optional padding
  ``attention_mask``, positions numbered from 0 in every row, padded keys
  masked: the references' call signature, used by reference samplers and
  parity tests.

Both return logits already aligned with the canvas (row for position i
predicts the token at position i): a model whose network predicts the next
position (Dream) shifts inside its class.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import ops
from server.models.kv_cache import CacheView, PagedKVCache
from server.models.layers import AttendFn, RMSNorm, Rotary


class RaggedLM(nn.Module):
    rotary: Rotary
    # Decoding modes the model supports (sampler.params.DECODING names).
    decoding_modes: tuple[str, ...] = ("exact", "prefix_cache", "dual_cache")
    # The attention softmax's dtype when it must differ from the scores'
    # (LLaDA-MoE's reference runs it in float32 even in a float64 model).
    attention_softmax_dtype: torch.dtype | None = None
    # Whether the layers run without reading the device on the host (no
    # expert routing by counts), so a use step can be captured: see has_static_step.
    static_step: bool = True

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: (rows, hidden) -> (rows, vocab)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _attention_kwargs(self) -> dict:
        dtype = self.attention_softmax_dtype
        return {} if dtype is None or dtype == self.dtype else {"softmax_dtype": dtype}

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
             logits_indices: torch.Tensor | None, rows_attend: AttendFn | None = None,
             tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """With ``rows_attend`` (attention whose queries are the
        ``logits_indices`` rows only, which must then be given), the last
        layer runs its queries, output projection and MLP on those rows
        alone: nothing after it reads the other tokens' states. ``tables``:
        rotary (sin, cos) covering every position (else grown to the
        largest one, read back from the device)."""
        sin, cos = tables or self.rotary.tables(int(positions.max()) + 1, input_ids.device)
        table_dtype = self.rotary.table_dtype(self.dtype)
        sin = sin.index_select(0, positions)[:, None, :].to(table_dtype)  # (num_tokens, 1, rotary_dim)
        cos = cos.index_select(0, positions)[:, None, :].to(table_dtype)
        x = self.embed(input_ids)
        layers = self.layers
        last = len(layers) - 1
        for i, layer in enumerate(layers):
            if i == last and rows_attend is not None:
                x = layer(x, sin, cos, functools.partial(rows_attend, i), rows=logits_indices)
                logits_indices = None
            else:
                x = layer(x, sin, cos, functools.partial(attend, i))
        if logits_indices is not None:
            x = x.index_select(0, logits_indices)  # the LM head only where the sampler needs logits
        return self.head(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: list[int],
                logits_indices: torch.Tensor | None = None, cache: CacheView | None = None,
                logits_cu_seqlens: list[int] | None = None, causal_blocks: list[int] | None = None) -> torch.Tensor:
        """input_ids, positions: (num_tokens,) packed sequences, sequence i
        spanning [cu_seqlens[i], cu_seqlens[i+1]). With ``cache``, tokens
        with a write slot store their keys/values, and sequence i's queries
        also attend to its first ``cache.cache_seqlens[i]`` cached keys.
        ``logits_cu_seqlens`` (optional) says that ``logits_indices`` is
        ascending with sequence i's rows at [logits_cu_seqlens[i],
        logits_cu_seqlens[i+1]); the last layer then computes those rows only.
        ``causal_blocks`` (block-causal models): sequence i's block length,
        else the config's ``block_causal_size`` for all. Returns logits (len(logits_indices) or num_tokens, vocab)."""
        extra = self._attention_kwargs()
        if self.config.block_causal_size:
            block = self.config.block_causal_size
            if causal_blocks is not None:  # (num_tokens,) each token's own sequence's block length
                lengths = torch.tensor([b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])], device=positions.device)
                block = torch.tensor(causal_blocks, device=positions.device).repeat_interleave(lengths)
            extra.update(causal_block=block, positions=positions)
        if cache is None:
            def attend(layer, q, k, v, cu_q=cu_seqlens):
                return ops.varlen_attention(q, k, v, cu_q, cu_seqlens, **extra)
        else:
            def key_plan():
                return cache.key_plan(cu_seqlens)

            def attend(layer, q, k, v, cu_q=cu_seqlens):
                # The CPU twin takes every layer's cached keys from one gather, made at its first call
                # (a step never reads the slots it writes); the Triton kernel reads the pages in place.
                def cached_kv():
                    return cache.gathered(layer, cu_seqlens)

                cache.write(layer, k, v)
                return ops.varlen_attention(q, k, v, cu_q, cu_seqlens, k_cache=cache.cache.k[layer],
                                            v_cache=cache.cache.v[layer], block_table=cache.block_table,
                                            cache_seqlens=cache.cache_seqlens, cached_kv=cached_kv,
                                            key_plan=key_plan, **extra)

        rows_attend = None
        if logits_cu_seqlens is not None:
            if logits_indices is None or len(logits_cu_seqlens) != len(cu_seqlens) \
                    or logits_cu_seqlens[-1] != logits_indices.numel():
                raise ValueError("logits_cu_seqlens must give each sequence's share of logits_indices")
            if not self.config.block_causal_size:  # block-causal attention needs every query's position
                rows_attend = functools.partial(attend, cu_q=logits_cu_seqlens)
        return self._run(input_ids, positions, attend, logits_indices, rows_attend)

    @property
    def has_static_step(self) -> bool:
        """Whether ``forward_static`` computes what ``forward`` does for a
        static cache use step (bidirectional attention in the scores' dtype,
        no routing that reads the device, no logits shift)."""
        return self.static_step and not self.config.block_causal_size and not self._attention_kwargs()

    def forward_static(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: PagedKVCache,
                       block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                       tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """A cache use step of equal-width sequences with every input a
        tensor read only on the device: no host syncs, shapes fixed by the
        arguments' shapes, so it can be captured as a CUDA graph and
        replayed with new contents in the same tensors. input_ids,
        positions: (num_seqs * width,), sequence i in rows [i * width, (i +
        1) * width); block_table (num_seqs, max_pages) and cache_seqlens
        (num_seqs,) int32: sequence i attends to its first cache_seqlens[i]
        slots and its own tokens; nothing is stored. ``tables``: rotary
        (sin, cos) covering every position. Returns logits of every token:
        (num_seqs * width, vocab)."""
        def attend(layer, q, k, v):
            return ops.static_attention(q, k, v, kv_cache.k[layer], kv_cache.v[layer], block_table, cache_seqlens)

        return self._run(input_ids, positions, attend, None, tables=tables)

    def forward_dense(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      logits_mask: torch.Tensor | None = None, block_length: int | None = None) -> torch.Tensor:
        """The references' interface: (batch, length) -> (batch, length, vocab).
        Padded keys (attention_mask == 0) are masked for every query. With a
        boolean ``logits_mask`` (batch, length), the LM head runs only on its
        true positions and the result is (num_true, vocab) in row-major order
        (training computes the loss on masked tokens only). ``block_length``:
        a block-causal model's block length, else its config's."""
        batch, length = input_ids.shape
        bias = None
        if attention_mask is not None and not bool(attention_mask.all()):
            bias = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, length) keys kept
        if self.config.block_causal_size:
            blocks = torch.arange(length, device=input_ids.device) // (block_length or self.config.block_causal_size)
            causal = blocks[None, :] <= blocks[:, None]  # (length, length) query -> keys seen
            bias = causal[None, None] if bias is None else bias & causal[None, None]
        positions = torch.arange(length, device=input_ids.device).repeat(batch)
        softmax_dtype = self._attention_kwargs().get("softmax_dtype")

        def attend(layer, q, k, v):
            q, k, v = (t.view(batch, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
            if k.shape[1] != q.shape[1]:
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            if softmax_dtype is None:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            else:  # the eager reference: float32 softmax of the model-dtype scores
                scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
                if bias is not None:
                    scores = scores.masked_fill(~bias, float("-inf"))
                o = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype) @ v
            return o.transpose(1, 2).reshape(batch * length, q.shape[1], q.shape[3])

        rows = None if logits_mask is None else logits_mask.reshape(-1).nonzero().squeeze(1)
        logits = self._run(input_ids.reshape(-1), positions, attend, rows)
        return logits if rows is not None else logits.view(batch, length, -1)


def config_from_dict(cls, raw: dict[str, Any], source: str, arch: str, required: tuple[str, ...],
                     generation: dict[str, Any] | None = None, unsupported: dict[str, Any] | None = None):
    """A config dataclass from a Hugging Face ``config.json`` dict: the
    ``required`` fields must be there, fields that would change the math
    (``unsupported``: name -> the only value handled) are refused rather
    than ignored, and ``mask_token_id`` / ``eos_token_id`` missing from
    config.json are taken from ``generation`` (generation_config.json), where
    LLaDA-MoE's and LLaDA2's checkpoints keep their mask id."""
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{source}: missing field(s) {', '.join(missing)} for {arch}")
    for key, only in (unsupported or {}).items():
        if raw.get(key) not in (only, None) and not (only is False and not raw.get(key)):
            raise ValueError(f"{source}: {key}={raw[key]!r} is not supported (only {only!r})")
    merged = dict(raw)
    for key in ("mask_token_id", "eos_token_id"):
        if merged.get(key) is None and (generation or {}).get(key) is not None:
            merged[key] = generation[key]
    if merged.get("mask_token_id") is None:
        raise ValueError(f"{source}: no mask_token_id in config.json or generation_config.json")
    names = set(cls.__dataclass_fields__)
    cfg = cls(**{k: v for k, v in merged.items() if k in names})
    cfg.validate(source)
    return cfg


class DecoderLM(RaggedLM):
    """Embedding, pre-norm decoder layers, final RMSNorm, LM head (tied to
    the embedding or not): the Hugging Face layout LLaDA-MoE, LLaDA2 and
    Dream share. Subclasses build the layers and name the tensors."""

    def __init__(self, config: Any, layers: list[nn.Module], vocab_size: int, hidden: int, eps: float,
                 tie_word_embeddings: bool, rotary: Rotary):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(vocab_size, hidden)
        self.decoder_layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = None if tie_word_embeddings else nn.Linear(hidden, vocab_size, bias=False)
        self.rotary = rotary

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder_layers

    def head(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(x), weight)

    def outer_params(self, embed: str, norm: str, head: str = "lm_head.weight") -> dict[str, tuple[torch.Tensor, int, int]]:
        """The embedding, final norm and (untied) LM head under their checkpoint names."""
        params = [(embed, self.embed_tokens.weight), (norm, self.norm.weight)]
        if self.lm_head is not None:
            params.append((head, self.lm_head.weight))
        return {name: (p, 0, p.shape[0]) for name, p in params}

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights (tests, benchmarks); norms at 1, expert biases at 0."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    param.fill_(1.0)
                elif name.endswith("expert_bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=g) * std)
