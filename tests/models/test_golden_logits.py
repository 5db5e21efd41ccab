"""Every model class against every logits entry of its golden set, made by
the reference's own modeling code: float64 and float32, dense (the
reference's call) and ragged (the engine's packed batch, pads dropped).

Float64 tolerances: 1e-10 where the reference computes a float64 model in
float64 (LLaDA, Dream). LLaDA-MoE's and LLaDA2's references keep float32
steps inside a float64 model (attention and router softmax, sigmoid, a
float32 router GEMM) whose last bits depend on the CPU's vector math: run on
this machine, those references themselves differ from their float64
goldens by 3.2e-7 and 1.2e-7, so 1e-6 is the bound that can hold for them.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from server.models.loader import load_model
from tests.conftest import golden_path

pytestmark = pytest.mark.golden

SETS = ["llada", "llada-moe", "llada2", "dream"]
TOL64 = {"llada": 1e-10, "llada-moe": 1e-6, "llada2": 1e-6, "dream": 1e-10}
TOL32 = 2e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


class GoldenSet:
    def __init__(self, name: str):
        self.name = name
        self.dir = golden_path(name)
        assert self.dir.is_dir(), f"golden set {name} missing at {self.dir}"
        self.logits = load_file(str(self.dir / "logits.safetensors"))
        self.arch = json.loads((self.dir / "config.json").read_text())["architectures"][0]
        self.shifted = self.arch == "DreamModel"  # goldens are the network's output, before Dream's shift
        block = self.logits.get("logits_block_length")
        self.block_length = None if block is None else int(block[0])
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, dtype: str) -> torch.nn.Module:
        if dtype not in self._models:
            model = load_model(self.dir, dtype, "cpu")
            if self.block_length is not None:  # block-causal at the golden's block length
                model.config.block_length = self.block_length
            self._models[dtype] = model
        return self._models[dtype]

    def entries(self) -> list[str]:
        """The prefixes of every logits entry: logits, padded_logits, ..."""
        return sorted({k.rsplit("_", 1)[0] for k in self.logits if k.endswith("logits_float64")})

    def align(self, ref: torch.Tensor) -> torch.Tensor:
        """The golden in our alignment (row i predicts token i)."""
        return torch.cat([ref[:, :1], ref[:, :-1]], dim=1) if self.shifted else ref


_SETS: dict[str, GoldenSet] = {}


@pytest.fixture(scope="module", params=SETS)
def golden(request) -> GoldenSet:
    if request.param not in _SETS:
        _SETS[request.param] = GoldenSet(request.param)
    return _SETS[request.param]


def _inputs(g: GoldenSet, entry: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if entry.startswith("padded"):
        ids = g.logits.get("padded_input_ids", g.logits["logits_input_ids"])
        return ids, g.logits["padded_attention_mask"]
    return g.logits["logits_input_ids"], None


def _ragged(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each row packed end to end without its pads, positions from 0 at its
    first real token. Returns (num_real_tokens, vocab)."""
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    rows = [ids[b][keep[b]] for b in range(ids.shape[0])]
    cu = [0]
    for r in rows:
        cu.append(cu[-1] + len(r))
    positions = torch.cat([torch.arange(len(r)) for r in rows])
    return model(torch.cat(rows), positions, cu)


def _compare_rows(g: GoldenSet, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Which real positions the aligned golden defines (Dream: not a row's
    first real token, whose shifted logits come from a pad or from itself)."""
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if g.shifted:
        first = keep.float().argmax(dim=1)
        keep = keep & (torch.arange(ids.shape[1])[None, :] > first[:, None])
    return keep


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_logits_entry(golden, dtype):
    tol = TOL64[golden.name] if dtype == "float64" else TOL32
    model = golden.model(dtype)
    for entry in golden.entries():
        ids, mask = _inputs(golden, entry)
        if golden.block_length is not None:  # "bidirectional_": no mask, i.e. one block over everything
            model.config.block_length = ids.shape[1] if entry.startswith("bidirectional") else golden.block_length
        ref = golden.align(golden.logits[entry + "_float64"])
        keep = _compare_rows(golden, ids, mask)
        # Dense with the padding mask, as the reference runs it (positions
        # from 0 in every row; Dream's reference numbers a padded row from its
        # first real token, which is the ragged layout below).
        if mask is None or not golden.shifted:
            dense = model.forward_dense(ids, mask)
            assert rel(dense[keep], ref[keep]) < tol, f"{entry} dense {dtype}"
        # Ragged: pads dropped. RoPE is relative, so a padded LLaDA-style row
        # renumbered from 0 agrees up to rounding only.
        ragged = _ragged(model, ids, mask)
        real = (torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())
        ragged_keep = keep[real]
        renumbered = mask is not None and not golden.shifted
        ragged_tol = max(tol, 1e-5) if renumbered else tol
        assert rel(ragged[ragged_keep], ref[keep]) < ragged_tol, f"{entry} ragged {dtype}"
        # The golden's own entry in this dtype, where it has one.
        if dtype == "float32" and entry + "_float32" in golden.logits:
            ref32 = golden.align(golden.logits[entry + "_float32"])
            assert rel(ragged[ragged_keep], ref32[keep]) < max(ragged_tol, TOL32), f"{entry} vs float32 golden"


def test_bfloat16_error_is_the_references(golden):
    """In bfloat16 the error against float64 is of the order of the
    reference's own bfloat16 run: rounding really happened, and no worse."""
    model = load_model(golden.dir, "bfloat16", "cpu")
    if golden.block_length is not None:
        model.config.block_length = golden.block_length
    assert model.dtype == torch.bfloat16
    ids = golden.logits["logits_input_ids"]
    ref = golden.align(golden.logits["logits_float64"])
    keep = _compare_rows(golden, ids, None)
    ours = rel(model.forward_dense(ids)[keep], ref[keep])
    theirs = rel(golden.align(golden.logits["logits_bfloat16"])[keep], ref[keep])
    assert 0.2 * theirs < ours <= 1.5 * theirs


def test_logits_rows_and_last_layer_short_path(golden):
    """The engine's call: LM head (and, where attention allows, the last
    layer) only on the requested rows, in a batch with a row-less sequence."""
    model = golden.model("float64")
    ids = golden.logits["logits_input_ids"]
    n = ids.shape[1]
    full = _ragged(model, ids, None)  # (2n, vocab)
    three = torch.cat([ids[0], ids[1], ids[0]])
    rows = torch.tensor([5, n - 1, 2 * n + 3])
    out = model(three, torch.arange(n).repeat(3), [0, n, 2 * n, 3 * n], rows, logits_cu_seqlens=[0, 2, 2, 3])
    assert rel(out, full[[5, n - 1, 3]]) < 1e-12
