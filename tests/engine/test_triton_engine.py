"""The engine end to end through the Triton kernels (attention and unmask
forced on with ``ops.set_backend("triton")``): the golden llada-tiny generate
cases token for token in float32, and every cache mode token for token
against the same engine on the torch twins. Without CUDA the kernels run on
CPU tensors under the Triton interpreter, switched on here before any kernel
module is imported (importing them is lazy: only a forced backend does it,
so the env var changes nothing for the tests that use the twins)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import ops  # noqa: E402
from sampler.params import DiffusionParams  # noqa: E402
from server.engine.llm import LLM  # noqa: E402
from tests.conftest import GOLDEN, golden_rows  # noqa: E402
from tests.engine.test_llm_golden import cut, params_of  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def llm(golden_dir):
    return LLM(str(golden_dir), dtype="float32", device=DEVICE)


def _generate(llm: LLM, backend: str, prompts, params) -> list[list[int]]:
    ops.set_backend(backend)
    try:
        return [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        ops.set_backend("auto")


def _count_kernel_launches(monkeypatch) -> dict[str, int]:
    """Counts calls into the kernel launchers, so a silent fallback to the
    twins cannot pass for the kernels."""
    from kernels import attention, unmask

    calls = {"attention": 0, "unmask": 0}
    for name, module, fn in (("attention", attention, "varlen_attention"), ("unmask", unmask, "unmask_scores")):
        real = getattr(module, fn)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, fn, counted)
    return calls


@pytest.mark.golden
def test_golden_cases_through_the_kernels(llm, monkeypatch):
    """Every golden row (guided, left-padded and uneven-quota cases
    included) in one ragged batch, through the kernels: the reference's
    tokens."""
    calls = _count_kernel_launches(monkeypatch)
    rows = golden_rows()
    got = _generate(llm, "triton", [r[1] for r in rows], [params_of(r[2]) for r in rows])
    assert got == [cut(r[3]) for r in rows]
    assert calls["attention"] > 0 and calls["unmask"] > 0


# Prompts of different lengths, so the packed batch is ragged and each
# sequence's block, suffix and cached keys start at a different offset.
PROMPTS = [[204, 68, 268, 43, 100, 190, 179, 266, 147, 12, 244, 58], [35, 225, 26], [221, 63, 12, 244, 58, 1, 2]]


@pytest.mark.parametrize("decoding", ["prefix_cache", "dual_cache"])
def test_cache_modes_through_the_kernels_match_the_twins(llm, decoding, monkeypatch):
    """The cache fill (keys stored while the whole canvas is computed) and
    the use steps (queries of block or block + suffix over keys read back
    from scattered pages) give the twins' tokens; the sampled request checks
    the in-kernel noise too."""
    params = [DiffusionParams(gen_length=16, steps=8, block_length=8, decoding=decoding),
              DiffusionParams(gen_length=12, steps=6, block_length=4, decoding=decoding),
              DiffusionParams(gen_length=16, steps=8, block_length=8, decoding=decoding, temperature=1.0, seed=7)]
    twins = _generate(llm, "torch", PROMPTS, params)
    calls = _count_kernel_launches(monkeypatch)
    assert _generate(llm, "triton", PROMPTS, params) == twins
    assert calls["attention"] > 0 and calls["unmask"] > 0
    assert all(len(t) > 0 for t in twins)


def test_graphed_static_steps_through_the_kernels(monkeypatch):
    """dual_cache's use steps captured (the CPU stand-in: the same closure
    replayed on the same buffers) through the static attention kernel: the
    twins' eager ragged tokens, while the batch goes from three requests
    (bucket 4) to two (bucket 2)."""
    from kernels import attention
    from server.engine.graphs import StandInGraph

    params = [DiffusionParams(gen_length=n, steps=n, block_length=8, decoding="dual_cache", seed=i, ignore_eos=True,
                              temperature=0.7 * (i == 2)) for i, n in enumerate([16, 8, 16])]
    eager = LLM(str(GOLDEN), dtype="float32", device=DEVICE, max_num_seqs=4)
    twins = _generate(eager, "torch", PROMPTS, params)
    graphed = LLM(str(GOLDEN), dtype="float32", device=DEVICE, max_num_seqs=4, enforce_eager=False)
    runner = graphed.engine.runner
    launches = []
    real = attention.static_attention
    monkeypatch.setattr(attention, "static_attention", lambda *a, **k: launches.append(a[0].shape[0]) or real(*a, **k))
    ops.set_backend("triton")
    try:
        runner.capture_graphs([8], 4, StandInGraph)  # tables of 64 keys: every canvas here fits
    finally:
        ops.set_backend("auto")
    launches.clear()
    assert _generate(graphed, "triton", PROMPTS, params) == twins
    layers = graphed.engine.model.config.n_layers
    assert launches == [4 * 8] * (7 * layers) + [2 * 8] * (7 * layers)
