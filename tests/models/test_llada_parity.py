"""The native model against logits made by LLaDA's own modeling code."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from server.models.loader import load_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def golden_logits(golden_dir):
    return load_file(str(golden_dir / "logits.safetensors"))


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-5)])
def test_logits_parity(golden_dir, golden_logits, dtype, tol):
    model = load_model(golden_dir, dtype, "cpu")
    ids = golden_logits["logits_input_ids"]
    ref = golden_logits["logits_float64"]
    assert rel(model.forward_dense(ids), ref) < tol
    # The engine's ragged path: both rows packed end to end.
    ragged = model(ids.reshape(-1), torch.arange(ids.shape[1]).repeat(2), [0, 40, 80])
    assert rel(ragged.view_as(ref), ref) < tol


def test_logits_parity_bfloat16(golden_dir, golden_logits):
    model = load_model(golden_dir, "bfloat16", "cpu")
    assert model.dtype == torch.bfloat16
    ref = golden_logits["logits_float64"]
    ours = rel(model.forward_dense(golden_logits["logits_input_ids"]), ref)
    theirs = rel(golden_logits["logits_bfloat16"], ref)
    # Same order as the reference's own bf16 error: rounding really happened, and no worse.
    assert 0.2 * theirs < ours <= 1.5 * theirs


def test_padded_logits(golden_dir, golden_logits):
    model = load_model(golden_dir, "float64", "cpu")
    ids, mask = golden_logits["logits_input_ids"], golden_logits["padded_attention_mask"]
    ref = golden_logits["padded_logits_float64"]
    keep = mask.bool()
    # Dense with the padding mask, exactly as the reference runs it.
    assert rel(model.forward_dense(ids, mask)[keep], ref[keep]) < 1e-10
    # Ragged: the pads are simply absent, positions restart at the first real token.
    row1 = ids[1][keep[1]]
    packed = torch.cat([ids[0], row1])
    positions = torch.cat([torch.arange(40), torch.arange(len(row1))])
    out = model(packed, positions, [0, 40, 40 + len(row1)])
    assert rel(out, ref[keep]) < 1e-5


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
