"""The reference sampler: a plain transcription of LLaDA's ``generate()``
(ML-GSAI/LLaDA, generate.py), the oracle the batched engine is tested
against and the baseline benchmarks compare to.

Four departures, each documented:
- randomness: instead of the global ``torch.rand`` the noise is drawn from
  the project's counter-based generator (``kernels.reference.philox_uniform``
  via ``sampler.schedule.step_seed``), so the reference and the engine draw
  the same noise and can be compared token for token at temperature > 0 too;
  ``seed`` may be one int or one per row;
- the reference's asserts are generalized as ``sampler.schedule`` documents
  (a shorter last block; steps not divisible by the number of blocks);
- ``model`` is any callable ``(x, attention_mask) -> logits`` (batch, length,
  vocab), e.g. ``LLaDAModel.forward_dense``;
- two more confidences (Dream's), as plainly: ``margin`` (top-1 minus top-2
  probability) and ``entropy`` (negative entropy of the distribution).
Where the original's asserts hold and temperature is 0, it is the original.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from kernels.reference import philox_uniform
from sampler.schedule import block_bounds, commit_quota, step_seed, steps_per_block


def _uniform(seeds: list[int], step: int, stream: int, gen_length: int, vocab: int | None) -> torch.Tensor:
    """(batch, gen_length[, vocab]) float64 draws of the project's generator."""
    pos = torch.arange(gen_length, dtype=torch.int64)
    offset = pos[:, None] * vocab + torch.arange(vocab)[None, :] if vocab else pos
    return torch.stack([philox_uniform(torch.tensor(step_seed(s, step, stream)), offset) for s in seeds]).double()


@torch.no_grad()
def generate(
    model: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = 126336,
    seed: int | list[int] = 0,
) -> torch.Tensor:
    batch, prompt_len = prompt.shape
    seeds = [seed] * batch if isinstance(seed, int) else list(seed)
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones((batch, gen_length), dtype=attention_mask.dtype, device=prompt.device)], dim=-1)
    prompt_index = x != mask_id

    blocks = block_bounds(gen_length, block_length)
    global_step = 0
    for (b0, b1), block_steps in zip(blocks, steps_per_block(steps, len(blocks))):
        block_mask_index = x[:, prompt_len + b0: prompt_len + b1] == mask_id
        num_transfer_tokens = [commit_quota(int(n), block_steps) for n in block_mask_index.sum(dim=1)]
        for i in range(block_steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                mask_ = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
                logits, un_logits = torch.chunk(model(x_, mask_), 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask)

            logits_with_noise = logits
            if temperature > 0:
                # add_gumbel_noise, float64: exp(logits) / (-log u) ** T, on the generated part
                u = _uniform(seeds, global_step, 0, gen_length, logits.shape[-1]).to(logits.device)
                logits_with_noise = logits.to(torch.float64).clone()
                gen = logits_with_noise[:, prompt_len:]
                logits_with_noise[:, prompt_len:] = gen.exp() / (-torch.log(u)) ** temperature
            x0 = torch.argmax(logits_with_noise, dim=-1)

            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking in ("margin", "entropy"):
                p = F.softmax(logits.to(torch.float64), dim=-1)
                if remasking == "margin":
                    top2 = torch.topk(p, 2, dim=-1).values
                    x0_p = top2[..., 0] - top2[..., 1]
                else:
                    x0_p = (p * torch.log(p.clamp_min(1e-300))).sum(dim=-1)
            elif remasking == "random":
                x0_p = torch.full(x0.shape, -np.inf, dtype=torch.float64, device=x0.device)
                x0_p[:, prompt_len:] = _uniform(seeds, global_step, 1, gen_length, None).to(x0.device)
            else:
                raise NotImplementedError(remasking)

            x0_p[:, prompt_len + b1:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)

            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j][i])
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
            global_step += 1
    return x
