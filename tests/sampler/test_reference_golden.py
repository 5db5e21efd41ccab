"""sampler/reference.py reproduces LLaDA's own generate() on the golden cases."""
from __future__ import annotations

import pytest
import torch

from sampler.reference import generate
from server.models.loader import load_model
from tests.conftest import golden_cases

pytestmark = pytest.mark.golden


@pytest.fixture(scope="module", params=["float64", "float32"])
def model(request, golden_dir):
    return load_model(golden_dir, request.param, "cpu")


@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c["name"])
def test_reference_matches_golden(model, case):
    mask = None if case["attention_mask"] is None else torch.tensor(case["attention_mask"])
    out = generate(model.forward_dense, torch.tensor(case["prompt"]), mask, mask_id=case["mask_id"], **case["params"])
    assert out.tolist() == case["expected"]
