"""The native LLaDA model's engine paths (LM head and last layer on the
requested rows) against logits made by LLaDA's own modeling code; every
logits entry of every golden set is checked in test_golden_logits.py."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from server.models.loader import load_model

pytestmark = pytest.mark.golden


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def golden_logits(golden_dir):
    return load_file(str(golden_dir / "logits.safetensors"))


def test_lm_head_only_on_requested_rows(golden_dir, golden_logits):
    model = load_model(golden_dir, "float64", "cpu")
    ids = golden_logits["logits_input_ids"].reshape(-1)
    positions = torch.arange(40).repeat(2)
    full = model(ids, positions, [0, 40, 80])
    rows = torch.tensor([3, 25, 41, 79])
    assert torch.equal(model(ids, positions, [0, 40, 80], rows), full[rows])


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_last_layer_only_on_requested_rows(golden_dir, golden_logits, dtype, tol):
    """With logits_cu_seqlens the last layer's queries, output projection and
    MLP run on the requested rows alone; the logits stay the reference's."""
    model = load_model(golden_dir, dtype, "cpu")
    ids = golden_logits["logits_input_ids"].reshape(-1)
    positions = torch.arange(40).repeat(2)
    ref = golden_logits["logits_float64"].reshape(80, -1)
    rows = torch.tensor([3, 4, 25, 41, 60, 79])
    calls = []
    last = model.blocks[-1]
    real = last.forward
    last.forward = lambda x, *a, **k: calls.append(k.get("rows") is not None) or real(x, *a, **k)
    out = model(ids, positions, [0, 40, 80], rows, logits_cu_seqlens=[0, 3, 6])
    assert calls == [True]  # the short path was taken
    assert out.shape == (6, ref.shape[1]) and rel(out, ref[rows]) < tol
    # A sequence without rows, in the middle of the batch.
    three = torch.cat([ids[:40], ids[40:], ids[:40]])
    out = model(three, torch.arange(40).repeat(3), [0, 40, 80, 120], torch.tensor([5, 90]),
                logits_cu_seqlens=[0, 1, 1, 2])
    assert rel(out, ref[[5, 10]]) < tol


def test_logits_cu_seqlens_must_match_the_rows(golden_dir, golden_logits):
    model = load_model(golden_dir, "float32", "cpu")
    ids = golden_logits["logits_input_ids"].reshape(-1)
    positions = torch.arange(40).repeat(2)
    for rows, cu in [(torch.tensor([3, 41]), [0, 1]), (torch.tensor([3, 41]), [0, 1, 3]), (None, [0, 1, 2])]:
        with pytest.raises(ValueError, match="logits_cu_seqlens"):
            model(ids, positions, [0, 40, 80], rows, logits_cu_seqlens=cu)
