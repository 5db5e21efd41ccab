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


# Each family's own decoding (sampler.params.DiffusionParams fields), as its
# reference generate() does it when called without options; a checkpoint's
# generation_config.json overrides them through the keys below.
_DECODING: dict[str, dict[str, Any]] = {
    "LLaDA2MoeModelLM": {"schedule": "llada2", "remasking": "threshold_quota", "threshold": 0.95,
                         "block_length": 32, "steps": 32},
    "DreamModel": {"schedule": "dream", "remasking": "origin", "eps": 1e-3, "alg_temp": 0.0},
}
# LLaDA2.1 (model_type llada21_moe, same architecture) edits tokens by default.
_LLADA21 = {"editing_threshold": 0.9, "max_post_steps": 16, "num_to_transfer": 1}
# generation_config.json key -> field, per schedule. LLaDA's takes no steps:
# its steps span the whole answer, so they only fit one canvas length.
_GENERATION_KEYS: dict[str, dict[str, str]] = {
    "llada": {"max_new_tokens": "gen_length", "block_length": "block_length"},
    "llada2": {"max_new_tokens": "gen_length", "block_length": "block_length", "steps": "steps",
               "threshold": "threshold", "editing_threshold": "editing_threshold",
               "max_post_steps": "max_post_steps", "num_to_transfer": "num_to_transfer"},
    "dream": {"max_new_tokens": "gen_length", "steps": "steps", "alg": "remasking", "alg_temp": "alg_temp",
              "eps": "eps", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k"},
}


def decoding_defaults(raw_config: dict[str, Any], generation: dict[str, Any] | None = None,
                      source: str = "generation_config.json") -> dict[str, Any]:
    """A checkpoint's decoding defaults as DiffusionParams fields: its
    family's, then what its generation config says (null values skipped).
    Raises ValueError naming a bad value."""
    arch = architecture(raw_config)
    out = dict(_DECODING.get(arch, {}))
    if raw_config.get("model_type") == "llada21_moe":
        out.update(_LLADA21)
    given = {}  # field -> the generation config key that set it
    for key, field in _GENERATION_KEYS[out.get("schedule", "llada")].items():
        value = (generation or {}).get(key)
        if value is not None:
            out[field], given[field] = value, key
    from sampler.params import DiffusionParams  # torch-free

    try:
        DiffusionParams(**out)
    except ValueError as e:
        field, _, why = str(e).partition(": ")
        raise ValueError(f"{source}: {given[field]} {why}" if field in given else f"{source}: {e}") from None
    return out
