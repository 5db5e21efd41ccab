"""Model classes by the ``architectures`` field of ``config.json``.

Dispatch is on ``architectures``, with one check of the fields present:
LLaDA-MoE's hub config says ``model_type: llada``, and a config naming
``LLaDAModelLM`` that carries MoE fields (``num_experts``,
``moe_layer_freq``) is LLaDA-MoE. A new family is one model file plus one
line here.
"""
from __future__ import annotations

import importlib
from typing import Any

# architecture -> (module, model class, config class)
_ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "LLaDAModelLM": ("server.models.llada", "LLaDAModel", "LLaDAConfig"),
    "LLaDAMoEModelLM": ("server.models.llada_moe", "LLaDAMoEModel", "LLaDAMoEConfig"),
    "LLaDA2MoeModelLM": ("server.models.llada2", "LLaDA2Model", "LLaDA2Config"),
    "DreamModel": ("server.models.dream", "DreamModel", "DreamConfig"),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def architecture(raw_config: dict[str, Any], source: str = "config.json") -> str:
    """The supported architecture a raw config.json dict describes."""
    archs = raw_config.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise ValueError(f"{source}: no 'architectures' field; supported: {', '.join(supported_architectures())}")
    for arch in archs:
        if arch == "LLaDAModelLM" and "moe_layer_freq" in raw_config and "num_experts" in raw_config:
            return "LLaDAMoEModelLM"
        if arch in _ARCHITECTURES:
            return arch
    raise ValueError(
        f"{source}: unknown architecture {', '.join(map(str, archs))}; "
        f"supported: {', '.join(supported_architectures())}"
    )


def resolve(raw_config: dict[str, Any], source: str = "config.json", generation: dict[str, Any] | None = None):
    """Returns (model class, parsed config) for a raw config.json dict;
    ``generation`` (generation_config.json) supplies a mask id the config
    lacks."""
    module, model_cls, config_cls = _ARCHITECTURES[architecture(raw_config, source)]
    mod = importlib.import_module(module)
    return getattr(mod, model_cls), getattr(mod, config_cls).from_dict(raw_config, source, generation)
