"""Dispatch by architectures and fields; config fields from the hub names."""
from __future__ import annotations

import json

import pytest

from server.models import registry
from tests.conftest import golden_path


def raw(name: str) -> dict:
    return json.loads((golden_path(name) / "config.json").read_text())


def generation(name: str) -> dict:
    return json.loads((golden_path(name) / "generation_config.json").read_text())


@pytest.mark.parametrize("name,cls", [("llada", "LLaDAModel"), ("llada-moe", "LLaDAMoEModel"),
                                      ("llada2", "LLaDA2Model"), ("dream", "DreamModel")])
def test_each_golden_config_resolves_to_its_class(name, cls):
    model_cls, cfg = registry.resolve(raw(name), "config.json", generation(name))
    assert model_cls.__name__ == cls
    assert cfg.mask_token_id == generation(name).get("mask_token_id", cfg.mask_token_id)


def test_llada_moe_hub_config_saying_llada_dispatches_on_fields():
    """LLaDA-MoE's hub config says model_type "llada"; its MoE fields decide."""
    config = raw("llada-moe") | {"model_type": "llada", "architectures": ["LLaDAModelLM"]}
    model_cls, _ = registry.resolve(config, "config.json", generation("llada-moe"))
    assert model_cls.__name__ == "LLaDAMoEModel"


def test_mask_id_only_in_generation_config_is_required():
    with pytest.raises(ValueError, match="no mask_token_id"):
        registry.resolve(raw("llada2"), "config.json", None)


@pytest.mark.parametrize("name,field,value", [("llada2", "norm_head", True), ("llada-moe", "clip_qkv", 8.0),
                                              ("llada-moe", "moe_router_score_function", "sigmoid"),
                                              ("dream", "rope_scaling", {"type": "yarn"})])
def test_fields_that_change_the_math_are_refused(name, field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        registry.resolve(raw(name) | {field: value}, "config.json", generation(name))


def test_llada_ids_come_from_the_checkpoint_never_from_defaults():
    """A LLaDA config without mask_token_id takes it (and EOS) from
    generation_config.json; with neither it is an error, not LLaDA-8B's ids."""
    config = {k: v for k, v in raw("llada").items() if k not in ("mask_token_id", "eos_token_id")}
    _, cfg = registry.resolve(config, "config.json", {"mask_token_id": 17, "eos_token_id": [5, 6]})
    assert (cfg.mask_token_id, cfg.eos_token_id) == (17, [5, 6])
    with pytest.raises(ValueError, match="no mask_token_id"):
        registry.resolve(config, "config.json", generation("llada"))
    _, cfg = registry.resolve(config | {"mask_token_id": 9}, "config.json", None)
    assert cfg.eos_token_id is None
