"""The MoE models through the Triton kernels (the interpreter on CPU):
LLaDA-MoE's and LLaDA2's golden logits in float32 with every routed expert
layer run by ``kernels.moe`` (and attention by ``kernels.attention`` where
the model's attention is non-causal), against the reference's float64
logits and against the same model on the torch twins."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("triton")

from kernels import moe  # noqa: E402
from server.models.loader import load_model  # noqa: E402
from tests.conftest import golden_path  # noqa: E402

pytestmark = pytest.mark.golden
TOL32 = 2e-5  # relative, as tests/models/test_golden_logits.py


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["llada-moe", "llada2"])
def test_golden_logits_through_the_moe_kernel(name, device, triton_backend, monkeypatch):
    directory = golden_path(name)
    golden = load_file(str(directory / "logits.safetensors"))
    model = load_model(directory, "float32", device.type)
    block = golden.get("logits_block_length")
    if block is not None:  # LLaDA2: block-causal at the golden's block length
        model.config.block_length = int(block[0])
    ids = golden["logits_input_ids"].to(device)  # (2, length)
    batch, length = ids.shape
    positions = torch.arange(length, device=device).repeat(batch)
    cu_seqlens = [i * length for i in range(batch + 1)]

    calls = []
    kernel = moe.fused_moe
    monkeypatch.setattr(moe, "fused_moe", lambda *a: calls.append(a[0].shape) or kernel(*a))
    with torch.no_grad():
        ours = model(ids.reshape(-1), positions, cu_seqlens).view(batch, length, -1).cpu()
        triton_backend.set_backend("torch")
        twin = model(ids.reshape(-1), positions, cu_seqlens).view(batch, length, -1).cpu()
    num_moe_layers = sum(1 for m in model.modules() if type(m).__name__ == "Experts")
    assert num_moe_layers >= 1 and len(calls) == num_moe_layers  # every expert layer took the kernel, once
    assert rel(ours, golden["logits_float64"]) < TOL32
    assert rel(ours, twin) < TOL32
    assert torch.equal(ours.argmax(-1), twin.argmax(-1))


def test_golden_generate_cases_through_the_moe_kernel(device, monkeypatch):
    """Golden generate cases in float32 with every routed expert layer on the
    kernel, token for token the reference's answers: two LLaDA-MoE rows in
    one ragged batch, one LLaDA2 case. (Attention and unmasking stay on their
    twins here: through the interpreter too, the engine takes minutes.)"""
    from kernels import ops
    from server.engine.llm import LLM
    from tests.conftest import golden_cases, golden_rows
    from tests.engine.test_family_decoding import cut, llada2_params
    from tests.engine.test_llm_golden import eos_of, params_of

    calls = []
    monkeypatch.setattr(ops, "fused_moe", lambda *a: calls.append(a[0].shape) or moe.fused_moe(*a))
    llm = LLM(str(golden_path("llada-moe")), dtype="float32", device=device.type)
    rows = [r for r in golden_rows("llada-moe") if r[2]["steps"] == 16 and r[2]["gen_length"] == 16]
    assert len(rows) >= 2
    outs = llm.generate([r[1] for r in rows], [params_of(r[2]) for r in rows])
    assert [o.token_ids for o in outs] == [cut(r[3], eos_of("llada-moe")) for r in rows]

    llm = LLM(str(golden_path("llada2")), dtype="float32", device=device.type)
    case = min(golden_cases("llada2"), key=lambda c: c["params"]["gen_length"] * c["params"]["steps"])
    out = llm.generate([case["prompt"][0]], [llada2_params(llm, case)])[0]
    assert out.token_ids == cut(case["expected"][0], case["eos_id"]), case["name"]
    assert len(calls) > 10
