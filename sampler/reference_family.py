"""Plain transcriptions of the other families' reference samplers, the
oracles the batched engine is tested against (as ``sampler.reference`` is
LLaDA's):

- ``llada2_generate``: LLaDA2.x's ``generate()`` (modeling_llada2_moe.py,
  ZHZisZZ/dllm @ca176752, a copy of the Hub remote code), and with
  ``editing_threshold`` LLaDA2.1's (llada21/modeling_llada21_moe.py): the
  block grid from position 0, the canvas padded to whole blocks, per block
  up to ``steps`` steps of threshold commits with the top-k fallback, the
  answer cut at ``gen_length`` and after its first EOS (kept), decoding
  stopped after the block that holds one (LLaDA2.0; LLaDA2.1 without
  eos_early_stop decodes every block, which changes nothing before the
  first EOS). LLaDA2.1 also re-writes decoded tokens of the current block
  whose prediction differs with probability > ``editing_threshold``, and
  keeps stepping a full block while it edits, up to ``max_post_steps``.
- ``dream_generate``: Dream's ``DreamGenerationMixin._sample`` (dllm's
  vendored copy of the Hub's generation_utils.py): timesteps linspace(1,
  eps, steps + 1), ``alg`` origin / maskgit_plus / topk_margin / entropy,
  ``alg_temp``; the whole canvas is returned, EOS is an ordinary token.

Departures, each as in ``sampler.reference``: randomness comes from the
project's counter-based streams (Gumbel-max for tokens at T > 0 through
``sampler.distribution.sampling_scores``, Philox uniforms keyed by
(seed, step, position) for origin's coins and alg_temp's Gumbel ranking)
instead of torch.multinomial / torch.rand, except that ``dream_generate``
takes recorded ``draws`` (a goldens' torch.rand values) for origin; and
``model`` is a callable (x (1 or batch, length)) -> aligned logits (Dream's
shift already applied, LLaDA2's block-causal mask at the call's block
length). With temperature 0 and alg_temp 0 nothing random remains.
"""
from __future__ import annotations

from typing import Callable

import torch

from kernels.reference import philox_uniform
from sampler.distribution import gumbel_rank, sampling_scores
from sampler.schedule import dream_timesteps, split_evenly, step_seed


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int, step: int,
            offsets: torch.Tensor, dream: bool) -> dict[str, torch.Tensor]:
    n = logits.shape[0]
    return sampling_scores(logits, torch.full((n,), float(temperature)), torch.full((n,), int(top_k or 0)),
                           torch.full((n,), float(top_p if top_p is not None else 1.0)),
                           torch.full((n,), step_seed(seed, step, 0)), offsets, torch.full((n,), dream))


@torch.no_grad()
def llada2_generate(
    model: Callable[[torch.Tensor, int], torch.Tensor],  # (x (1, L), block_length) -> logits (1, L, vocab)
    prompt: list[int],
    gen_length: int = 2048,
    block_length: int = 32,
    steps: int = 32,
    threshold: float = 0.95,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    *,
    mask_id: int,  # the checkpoint's mask_token_id
    eos_id: int | None,  # its generation config's eos_token_id
    editing_threshold: float | None = None,
    max_post_steps: int = 16,
    num_to_transfer: int = 1,
    seed: int = 0,
) -> list[int]:
    """The generated tokens, cut after the first EOS (inclusive), as the reference returns them."""
    steps = min(steps, gen_length)
    P = len(prompt)
    num_blocks = -(-(P + gen_length) // block_length)
    x = torch.full((1, num_blocks * block_length), mask_id, dtype=torch.long)
    x[0, :P] = torch.tensor(prompt, dtype=torch.long)
    quota = split_evenly(block_length, steps)
    global_step = 0
    for num_block in range(P // block_length, num_blocks):
        end = (num_block + 1) * block_length
        start = end - block_length
        cur = x[:, :end]
        offsets = torch.arange(start, end) - P  # the block's positions in the generated part
        editable_base = torch.arange(start, end) >= P
        step, post_steps = 0, 0
        while True:
            active = cur[0, -block_length:] == mask_id
            if editing_threshold is None:
                if step >= steps or not bool(active.any()):
                    break
            else:
                if not bool(active.any()):
                    post_steps += 1
                if post_steps > max_post_steps:
                    break
            logits = model(cur, block_length)[0, -block_length:]
            s = _sample(logits, temperature, top_k, top_p, seed, global_step, offsets, False)
            x0, p = s["x0"], s["prob"].double()
            k = num_to_transfer if editing_threshold is not None else quota[step]
            confidence = torch.where(active, p, torch.tensor(-torch.inf, dtype=p.dtype))
            high = (confidence > threshold) & active
            transfer = torch.zeros(block_length, dtype=torch.bool)
            if int(high.sum()) >= k:
                transfer = high
            elif bool(active.any()):
                transfer[torch.topk(confidence, min(k, int(active.sum()))).indices] = True
            edit = torch.zeros(block_length, dtype=torch.bool)
            if editing_threshold is not None:
                old = cur[0, -block_length:]
                edit = ~active & editable_base & (p > editing_threshold) & (x0 != old)
            block = cur[0, -block_length:]
            block[transfer | edit] = x0[transfer | edit]
            step += 1
            global_step += 1
            if editing_threshold is not None and not bool(active.any()) and not bool(edit.any()):
                break
        if eos_id is not None and editing_threshold is None and bool((x[0, P:end] == eos_id).any()):
            break
    answer = x[0, P:P + gen_length].tolist()
    return answer[: answer.index(eos_id) + 1] if eos_id in answer else answer


@torch.no_grad()
def dream_generate(
    model: Callable[[torch.Tensor], torch.Tensor],  # x (batch, L) -> shifted logits (batch, L, vocab)
    prompt: torch.Tensor,  # (batch, P)
    max_new_tokens: int,
    steps: int = 512,
    eps: float = 1e-3,
    alg: str = "origin",
    alg_temp: float = 0.0,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    mask_id: int | None = None,  # the checkpoint's mask_token_id (required)
    draws: list[list[float]] | None = None,  # origin: each step's torch.rand values, masked positions row-major
    seed: int = 0,
) -> torch.Tensor:
    """The whole final canvas (batch, P + max_new_tokens)."""
    if mask_id is None:
        raise TypeError("dream_generate: mask_id is required (the checkpoint's mask_token_id)")
    batch, P = prompt.shape
    x = torch.cat([prompt, torch.full((batch, max_new_tokens), mask_id, dtype=torch.long)], dim=1)
    timesteps = torch.tensor(dream_timesteps(steps, eps), dtype=torch.float32)
    assert torch.equal(timesteps, torch.linspace(1, eps, steps + 1)), "float32 timesteps differ from torch's"
    offsets_all = torch.arange(x.shape[1]) - P
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x)
        t, s = timesteps[i], timesteps[i + 1]
        rows = mask_index.nonzero()  # (n, 2) row-major
        offs = offsets_all[rows[:, 1]]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else torch.tensor(1.0)
            if draws is not None:
                u = torch.tensor(draws[i], dtype=torch.float32)
            else:
                u = torch.cat([philox_uniform(torch.full((int(m.sum()),), step_seed(seed, i, 1)), offsets_all[m])
                               for m in mask_index])
            go = u < p_transfer
            sampled = _sample(logits[mask_index][go], temperature, top_k or 0, top_p, seed, i, offs[go], True)
            flat = x[mask_index]
            flat[go] = sampled["x0"]
            x[mask_index] = flat
            continue
        scores = _sample(logits[mask_index], temperature, top_k or 0, top_p, seed, i, offs, True)
        confidence = {"maskgit_plus": scores["prob"], "topk_margin": scores["margin"],
                      "entropy": -scores["entropy"]}[alg]
        num_mask = mask_index.sum() / mask_index.shape[0]
        k = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
        if alg_temp:
            u = torch.cat([philox_uniform(torch.full((int(m.sum()),), step_seed(seed, i, 1)), offsets_all[m])
                           for m in mask_index])
            confidence = gumbel_rank(confidence, u, torch.full_like(u, alg_temp, dtype=torch.float64))
        full = torch.full(x.shape, -torch.inf, dtype=torch.float64)
        full[mask_index] = confidence.double()
        if k > 0:
            x0_full = torch.full_like(x, mask_id)
            x0_full[mask_index] = scores["x0"]
            idx = torch.topk(full, k, dim=1).indices
            x.scatter_(1, idx, x0_full.gather(1, idx))
    return x
