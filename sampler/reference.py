"""The reference sampler: a plain transcription of LLaDA's ``generate()``
(ML-GSAI/LLaDA, generate.py), the oracle the batched engine is tested
against and the baseline benchmarks compare to; and of its likelihood
estimate ``get_log_likelihood`` (get_log_likelihood.py, the same code as
eval_llada.py's) with eval_llada.py's greedy check
``suffix_greedy_prediction``, the oracle of ``sampler.likelihood``.

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

The likelihood transcription departs from the original in its draws only:
``torch.randint`` (k) and ``torch.randperm`` (the masked positions) become
the per-request Philox streams ``sampler.likelihood`` documents, keyed by
the Monte Carlo batch index, so the engine draws the same masks.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from kernels.reference import philox_uint32, philox_uniform
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
    *,
    mask_id: int,  # the checkpoint's mask_token_id
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


def forward_process(batch: torch.Tensor, prompt_index: torch.Tensor, mask_id: int, seed: int,
                    batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, l = batch.shape

    target_len = (l - prompt_index.sum()).item()
    # k = torch.randint(1, target_len + 1, ()), from the request's stream
    r = int(philox_uint32(torch.tensor(step_seed(seed, batch_index, 0)), torch.tensor(0)))
    k = torch.tensor(1 + ((r * target_len) >> 32), device=batch.device)

    x = torch.round(torch.linspace(float(k), k + (b - 1) * (target_len / b), steps=b, device=batch.device)).long()
    x = ((x - 1) % target_len) + 1
    assert x.min() >= 1 and x.max() <= target_len

    indices = torch.arange(target_len, device=batch.device).repeat(b, 1)
    is_mask = indices < x.unsqueeze(1)
    stream = torch.tensor(step_seed(seed, batch_index, 1))
    for i in range(b):
        # torch.randperm(target_len), from the request's stream
        keys = philox_uint32(stream, i * target_len + torch.arange(target_len))
        randperm = torch.sort(keys, stable=True).indices
        is_mask[i] = is_mask[i][randperm]

    is_mask = torch.cat((torch.zeros(b, prompt_index.sum(), dtype=torch.bool, device=batch.device), is_mask), dim=1)
    noisy_batch = torch.where(is_mask, mask_id, batch)

    # Return the masked batch and the mask ratio
    return noisy_batch, (x / target_len).unsqueeze(1).repeat(1, l)


def get_logits(model, batch, prompt_index, cfg_scale, mask_id):
    if cfg_scale > 0.:
        assert len(prompt_index) == batch.shape[1]
        prompt_index = prompt_index.unsqueeze(0).repeat(batch.shape[0], 1)
        un_batch = batch.clone()
        un_batch[prompt_index] = mask_id
        batch = torch.cat([batch, un_batch])

    logits = model(batch, None)

    if cfg_scale > 0.:
        logits, un_logits = torch.chunk(logits, 2, dim=0)
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
    return logits


@torch.no_grad()
def get_log_likelihood(model: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], prompt: torch.Tensor,
                       answer: torch.Tensor, mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.,
                       *, mask_id: int, seed: int = 0) -> float:
    seq = torch.concatenate([prompt, answer])[None, :]
    seq = seq.repeat((batch_size, 1))
    prompt_index = torch.arange(seq.shape[1]) < len(prompt)

    loss_ = []
    for batch_index in range(mc_num // batch_size):
        perturbed_seq, p_mask = forward_process(seq, prompt_index, mask_id, seed, batch_index)
        mask_index = perturbed_seq == mask_id

        logits = get_logits(model, perturbed_seq, prompt_index, cfg_scale, mask_id)

        loss = F.cross_entropy(logits[mask_index], seq[mask_index], reduction='none') / p_mask[mask_index]
        loss = loss.sum() / batch_size

        loss_.append(loss.item())

    return - sum(loss_) / len(loss_)


@torch.no_grad()
def suffix_greedy_prediction(model: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                             prefix: torch.Tensor, target: torch.Tensor, cfg_scale: float,
                             mask_id: int) -> bool:
    seq = torch.full((1, len(prefix) + len(target)), mask_id)
    prompt_index = torch.arange(seq.shape[1]) < len(prefix)
    seq[0, :len(prefix)] = prefix

    for i in range(len(target)):
        mask_index = (seq == mask_id)
        logits = get_logits(model, seq, prompt_index, cfg_scale, mask_id)[mask_index]
        x0 = torch.argmax(logits, dim=-1)

        p = torch.softmax(logits.to(torch.float32), dim=-1)
        confidence = torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)).squeeze(dim=-1)
        _, index = torch.sort(confidence, descending=True)
        x0[index[1:]] = mask_id
        seq[mask_index] = x0.clone()
    correct = target == seq[0, len(prefix):]
    correct = torch.all(correct)
    return bool(correct)
