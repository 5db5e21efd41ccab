"""Tensor parallelism (Megatron-style) for every model class, on
torch.distributed (gloo on CPU, NCCL on GPUs).

``shard_model`` turns a model built on the meta device into one rank's
shard, replacing modules in place, so the model files keep their forward
code unchanged:
- q/k/v (fused) and gate/up (fused) are column-parallel: each rank keeps
  its heads' rows (q heads split evenly; KV heads split too, or, when there
  are fewer KV heads than ranks, the one KV head its q heads read,
  replicated) and its slice of the intermediate size;
- the attention output and MLP down projections are row-parallel: each rank
  multiplies its input columns and one ``all_reduce`` sums the partial
  outputs (the bias added once, after it);
- MoE layers: the experts are split across ranks (expert parallel), the
  router runs on every rank, each rank computes its experts' share of the
  weighted sum and one ``all_reduce`` (in the combine's dtype) adds the
  shares; the shared expert is column/row parallel. Dispatch is implicit:
  every rank sees every token (the residual stream is replicated), so no
  all-to-all is needed;
- the embedding and the LM head are vocabulary-parallel: the embedding
  looks up the ids it holds and ``all_reduce`` fills in the rest; the head
  gives each rank the logits of its vocabulary slice, which the sampler
  reduces without gathering them (``kernels.vocab_parallel``), and
  ``model.vocab_shard`` describes.
A sharded model's ``config`` is a copy whose KV head count is the rank's
(what its KV cache holds).

``load_sharded`` reads only the rank's shard of each checkpoint tensor
(safetensors ``get_slice``: rows for column-parallel and vocabulary
tensors, columns for row-parallel ones, whole experts for expert-parallel).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kernels.vocab_parallel import VocabShard, vocab_bounds
from server.models.layers import Attention, GatedMLP
from server.models.moe import Experts


@dataclass
class Parallel:
    """One rank's place in its tensor-parallel group."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None  # None = the default (world) group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def part(self, n: int) -> tuple[int, int]:
        """This rank's [start, end) of n things split as evenly as possible."""
        b = vocab_bounds(n, self.size)
        return b[self.rank], b[self.rank + 1]


@dataclass
class Split:
    """Which part of a full parameter a rank keeps, in the parameter's row
    view (2-D: (-1, last dim); 1-D: one element per row): along ``dim`` (0
    rows, 1 columns), the ``pieces`` [start, end) concatenated in order."""

    dim: int
    pieces: list[tuple[int, int]]


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r @ W_r^T (+ bias once): x arrives split by
    columns, as the column-parallel layer before it leaves it."""

    def __init__(self, in_local: int, out: int, bias: bool, par: Parallel):
        super().__init__()
        self.par = par
        self.weight = nn.Parameter(torch.empty(out, in_local))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.par.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the embedding; ids outside them give zeros,
    which the all-reduce fills with the owning rank's row (x + 0 is exact)."""

    def __init__(self, start: int, end: int, vocab_size: int, hidden: int, par: Parallel):
        super().__init__()
        self.start, self.end, self.vocab_size, self.par = start, end, vocab_size, par
        self.weight = nn.Parameter(torch.empty(end - start, hidden))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mine = (input_ids >= self.start) & (input_ids < self.end)
        x = F.embedding(torch.where(mine, input_ids - self.start, 0), self.weight)
        return self.par.all_reduce(x.masked_fill(~mine[:, None], 0))


class LocalExperts(nn.Module):
    """Experts [first, first + num_local) of a routed layer: each rank
    computes the weighted sum over only the (token, k) pairs routed to its
    experts, the others contributing exactly zero, in the same order and
    dtypes as ``kernels.reference.fused_moe``, and the partial sums are
    all-reduced in the combine's dtype (LLaDA2 combines in float32 whatever
    the model dtype), so with two experts per token the sum is the one the
    whole layer computes, bit for bit."""

    def __init__(self, first: int, num_local: int, hidden: int, intermediate: int, par: Parallel):
        super().__init__()
        self.first, self.intermediate, self.par = first, intermediate, par
        self.w_gate_up = nn.Parameter(torch.empty(num_local, 2 * intermediate, hidden))
        self.w_down = nn.Parameter(torch.empty(num_local, hidden, intermediate))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        num_local = self.w_down.shape[0]
        local = (topk_ids >= self.first) & (topk_ids < self.first + num_local)
        # Pairs for other ranks' experts go to a zero-weight slot past the
        # local experts, which computes nothing.
        ids = torch.where(local, topk_ids - self.first, num_local)
        weights = torch.where(local, topk_weights, torch.zeros_like(topk_weights))
        num_tokens, top_k = ids.shape
        flat = ids.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=num_local + 1).tolist()
        y = x.new_zeros(num_tokens * top_k, x.shape[1])  # (pair, hidden)
        start, inter = 0, self.intermediate
        for e, n in enumerate(counts[:num_local]):
            if n:
                pairs = order[start:start + n]
                gate_up = x.index_select(0, pairs // top_k) @ self.w_gate_up[e].t()
                y[pairs] = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ self.w_down[e].t()
            start += n
        partial = (y.view(num_tokens, top_k, -1).to(weights.dtype) * weights[..., None]).sum(dim=1)
        return self.par.all_reduce(partial).to(x.dtype)


def _kv_heads(n_heads: int, n_kv: int, par: Parallel) -> tuple[tuple[int, int], tuple[int, int]]:
    """This rank's [start, end) q heads and KV heads."""
    if n_heads % par.size:
        raise ValueError(f"tensor parallel size {par.size} does not divide the {n_heads} attention heads")
    per = n_heads // par.size
    q = (par.rank * per, (par.rank + 1) * per)
    if n_kv % par.size == 0:
        k = n_kv // par.size
        return q, (par.rank * k, (par.rank + 1) * k)
    if par.size % n_kv:
        raise ValueError(f"tensor parallel size {par.size} and the {n_kv} KV heads: neither divides the other")
    kv = q[0] // (n_heads // n_kv)  # fewer KV heads than ranks: the one this rank's q heads read, replicated
    return q, (kv, kv + 1)


class _Sharder:
    """Replaces a meta model's modules by their shards and records, for each
    full parameter (by its storage), where its shard lives and which part."""

    def __init__(self, model: nn.Module, par: Parallel):
        self.par = par
        # full parameter storage -> (module, attribute, Split or None = replicated)
        self.plan: dict[int, tuple[nn.Module, str, Split | None]] = {}
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                self.plan[_key(p)] = (module, name, None)

    def put(self, full: torch.Tensor, module: nn.Module, name: str, split: Split | None) -> None:
        self.plan[_key(full)] = (module, name, split)

    def column(self, linear: nn.Linear, pieces: list[tuple[int, int]]) -> nn.Linear:
        rows = sum(b - a for a, b in pieces)
        new = nn.Linear(linear.in_features, rows, bias=linear.bias is not None)
        self.put(linear.weight, new, "weight", Split(0, pieces))
        if linear.bias is not None:
            self.put(linear.bias, new, "bias", Split(0, pieces))
        return new

    def row(self, linear: nn.Linear, start: int, end: int) -> RowParallelLinear:
        new = RowParallelLinear(end - start, linear.out_features, linear.bias is not None, self.par)
        self.put(linear.weight, new, "weight", Split(1, [(start, end)]))
        if linear.bias is not None:
            self.put(linear.bias, new, "bias", None)
        return new

    def qkv(self, linear: nn.Linear, n_heads: int, n_kv: int, head_dim: int) -> tuple[nn.Linear, int, int]:
        (q0, q1), (k0, k1) = _kv_heads(n_heads, n_kv, self.par)
        q_rows, kv_rows = n_heads * head_dim, n_kv * head_dim
        pieces = [(q0 * head_dim, q1 * head_dim), (q_rows + k0 * head_dim, q_rows + k1 * head_dim),
                  (q_rows + kv_rows + k0 * head_dim, q_rows + kv_rows + k1 * head_dim)]
        return self.column(linear, pieces), q1 - q0, k1 - k0

    def gate_up(self, linear: nn.Linear, intermediate: int) -> tuple[nn.Linear, int, int]:
        a, b = self.par.part(intermediate)
        return self.column(linear, [(a, b), (intermediate + a, intermediate + b)]), a, b

    def attention(self, attn: Attention) -> None:
        attn.qkv_proj, attn.n_heads, attn.n_kv_heads = self.qkv(attn.qkv_proj, attn.n_heads, attn.n_kv_heads,
                                                                attn.head_dim)
        hd = attn.head_dim
        attn.o_proj = self.row(attn.o_proj, self.par.rank * attn.n_heads * hd, (self.par.rank + 1) * attn.n_heads * hd)

    def mlp(self, mlp: GatedMLP) -> None:
        mlp.gate_up_proj, a, b = self.gate_up(mlp.gate_up_proj, mlp.intermediate)
        mlp.down_proj = self.row(mlp.down_proj, a, b)
        mlp.intermediate = b - a

    def experts(self, experts: Experts) -> LocalExperts:
        num, hidden, inter = experts.w_down.shape
        e0, e1 = self.par.part(num)
        new = LocalExperts(e0, e1 - e0, hidden, inter, self.par)
        self.put(experts.w_gate_up, new, "w_gate_up", Split(0, [(2 * inter * e0, 2 * inter * e1)]))
        self.put(experts.w_down, new, "w_down", Split(0, [(hidden * e0, hidden * e1)]))
        return new

    def moe(self, block: nn.Module) -> None:
        """A routed block (router, ``experts``, optional shared GatedMLP):
        the router on every rank, local experts, the shared expert column/row
        parallel; one all-reduce each for the routed and the shared output."""
        block.experts = self.experts(block.experts)
        for child in block.children():
            if isinstance(child, GatedMLP):
                self.mlp(child)

    def vocab(self, embedding: nn.Embedding, head: nn.Linear | None) -> tuple[VocabParallelEmbedding, nn.Linear | None]:
        num, hidden = embedding.weight.shape
        a, b = self.par.part(num)
        emb = VocabParallelEmbedding(a, b, num, hidden, self.par)
        self.put(embedding.weight, emb, "weight", Split(0, [(a, b)]))
        new_head = None
        if head is not None:
            new_head = nn.Linear(hidden, b - a, bias=False)
            self.put(head.weight, new_head, "weight", Split(0, [(a, b)]))
        return emb, new_head


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def shard_model(model: nn.Module, par: Parallel) -> dict[int, tuple[nn.Module, str, Split | None]]:
    """Shards a model built on the meta device in place (see the module
    docstring). Returns the plan ``load_sharded`` follows: full parameter
    storage -> (module holding its shard, attribute, Split; None = whole)."""
    from server.models.base import DecoderLM
    from server.models.llada import LLaDAModel

    s = _Sharder(model, par)
    if isinstance(model, LLaDAModel):
        for block in model.blocks:
            _shard_llada_block(s, block)
        model.wte, model.ff_out = s.vocab(model.wte, model.ff_out)
        config = copy.copy(model.config)
        config.n_kv_heads = model.blocks[0].n_kv_heads
    elif isinstance(model, DecoderLM):
        for layer in model.decoder_layers:
            s.attention(layer.attn)
            if isinstance(layer.mlp, GatedMLP):
                s.mlp(layer.mlp)
            elif isinstance(getattr(layer.mlp, "experts", None), Experts):
                s.moe(layer.mlp)
            else:
                raise ValueError(f"no tensor-parallel plan for {type(layer.mlp).__name__}")
        model.embed_tokens, model.lm_head = s.vocab(model.embed_tokens, model.lm_head)
        config = copy.copy(model.config)
        config.num_key_value_heads = model.decoder_layers[0].attn.n_kv_heads
    else:
        raise ValueError(f"no tensor-parallel plan for {type(model).__name__}")
    model.config = config
    vocab = model.wte if isinstance(model, LLaDAModel) else model.embed_tokens
    model.vocab_shard = VocabShard(par.rank, par.size, vocab.vocab_size, par.group)
    model.parallel = par
    return s.plan


def shard_and_load(model: nn.Module, files: list[Path], dtype: torch.dtype, device: torch.device,
                   par: Parallel) -> nn.Module:
    """Shards a meta model, allocates the shard in ``dtype`` on ``device``
    and fills it with only its parts of each checkpoint tensor."""
    from safetensors import safe_open

    from server.models.loader import CheckpointError, _skip_init, check_entries, materialize, read_header

    table = model.checkpoint_params()  # full: checkpoint name -> (meta tensor, rows)
    entries = [e for f in files for e in read_header(f)]
    check_entries(table, entries, files)
    with torch.device("meta"), _skip_init():
        plan = shard_model(model, par)
    materialize(model, dtype, device)
    with torch.no_grad():
        for file in files:
            names = [e.name for e in entries if e.file == file]
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    full, r0, r1 = table[name]
                    if _key(full) not in plan:
                        raise CheckpointError(f"{file}: no tensor-parallel place for {name}")
                    module, attr, split = plan[_key(full)]
                    _read_shard(f.get_slice(name), r0, r1, _row_view(getattr(module, attr).data), split)
    return model


def _row_view(t: torch.Tensor) -> torch.Tensor:
    """The 2-D view a Split's coordinates refer to (see ``Split``)."""
    return t.view(-1, 1) if t.dim() == 1 else t.view(-1, t.shape[-1])


def _read_shard(tensor_slice: Any, r0: int, r1: int, local: torch.Tensor, split: Split | None) -> None:
    """Copies a checkpoint tensor covering full rows [r0, r1) of its
    parameter's row view into ``local`` (the shard's row view): the rows or
    columns ``split`` keeps, each read alone from the file."""
    def put(dest: torch.Tensor, src: torch.Tensor) -> None:
        dest.copy_(src.reshape(dest.shape))

    if split is None:
        put(local[r0:r1], tensor_slice[:])
    elif split.dim == 0:
        at = 0
        for a, b in split.pieces:
            x, y = max(a, r0), min(b, r1)
            if x < y:
                put(local[at + x - a:at + y - a], tensor_slice[x - r0:y - r0])
            at += b - a
    else:
        at = 0
        for a, b in split.pieces:
            put(local[r0:r1, at:at + b - a], tensor_slice[:, a:b])
            at += b - a


def _shard_llada_block(s: _Sharder, block: nn.Module) -> None:
    hd = block.head_dim
    block.qkv_proj, block.n_heads, block.n_kv_heads = s.qkv(block.qkv_proj, block.n_heads, block.n_kv_heads, hd)
    r = s.par.rank
    block.attn_out = s.row(block.attn_out, r * block.n_heads * hd, (r + 1) * block.n_heads * hd)
    inter = block.ff_out.in_features
    block.gate_up_proj, a, b = s.gate_up(block.gate_up_proj, inter)
    block.ff_out = s.row(block.ff_out, a, b)
