"""The model runner: the only place in the engine that builds tensors.

It packs the scheduled canvases into one ragged batch (sequences end to end,
``cu_seqlens``, no padding), runs the model with the LM head only on the rows
(each sequence's masked positions in its current block), applies
classifier-free guidance where asked, runs the sampler's denoising step and
returns plain lists.
"""
from __future__ import annotations

import torch

from sampler.block_diffusion import StepRows, apply_cfg, denoise_step
from server.engine.messages import RunnerOutput, SchedulerOutput


class ModelRunner:
    def __init__(self, model: torch.nn.Module, mask_id: int):
        self.model = model
        self.mask_id = mask_id
        self.device = model.device

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        seqs = sched.seqs
        if not seqs:
            return RunnerOutput()
        ids: list[int] = []
        positions: list[int] = []
        cu_seqlens = [0]
        cond_rows: list[int] = []  # packed index of every row's logits
        uncond_rows: list[int] = []  # the same rows in the unconditional canvas (cfg only)
        for s in seqs:
            start = cu_seqlens[-1]
            ids += s.canvas
            positions += range(len(s.canvas))
            cu_seqlens.append(start + len(s.canvas))
            cond_rows += [start + p for p in s.rows]
        for s in seqs:  # unconditional canvases after all conditional ones
            if s.cfg_scale > 0:
                start = cu_seqlens[-1]
                ids += [self.mask_id] * s.prompt_len + s.canvas[s.prompt_len:]
                positions += range(len(s.canvas))
                cu_seqlens.append(start + len(s.canvas))
                uncond_rows += [start + p for p in s.rows]

        dev = self.device
        logits = self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            cu_seqlens,
            torch.tensor(cond_rows + uncond_rows, dtype=torch.long, device=dev),
        )
        if uncond_rows:
            logits = self._guide(logits[: len(cond_rows)], logits[len(cond_rows):], seqs)

        rows = StepRows.build(
            row_offsets=[[p - s.prompt_len for p in s.rows] for s in seqs],
            quotas=[s.quota for s in seqs],
            temperatures=[s.temperature for s in seqs],
            seeds=[s.seed for s in seqs],
            random_seeds=[s.random_seed for s in seqs],
            remasking=[s.remasking for s in seqs],
            device=dev,
            top_ks=[s.top_k for s in seqs],
            top_ps=[s.top_p for s in seqs],
        )
        x0, commit = denoise_step(logits, rows)
        x0, commit = x0.tolist(), commit.tolist()

        out = RunnerOutput()
        i = 0
        for s in seqs:
            picked = [(p, x0[i + j]) for j, p in enumerate(s.rows) if commit[i + j]]
            out.commits[s.req_id] = ([p for p, _ in picked], [t for _, t in picked])
            i += len(s.rows)
        return out

    def _guide(self, cond: torch.Tensor, uncond: torch.Tensor, seqs) -> torch.Tensor:
        """Replaces the rows of guided sequences by their cfg combination."""
        scale, guided, i = [], [], 0
        for s in seqs:
            n = len(s.rows)
            if s.cfg_scale > 0:
                guided += range(i, i + n)
                scale += [s.cfg_scale] * n
            i += n
        idx = torch.tensor(guided, dtype=torch.long, device=cond.device)
        s_t = torch.tensor(scale, dtype=cond.dtype, device=cond.device)[:, None]
        out = cond.clone()
        out[idx] = apply_cfg(cond[idx], uncond, s_t)
        return out
