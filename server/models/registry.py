"""Model classes by the ``architectures`` field of ``config.json``.

Dispatch is on ``architectures``, not ``model_type``: LLaDA-MoE's hub config
also says ``model_type: llada``. A new family (Dream, LLaDA-MoE) is one model
file plus one line here.
"""
from __future__ import annotations

import importlib
from typing import Any

# architecture -> (module, model class, config class)
_ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "LLaDAModelLM": ("server.models.llada", "LLaDAModel", "LLaDAConfig"),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def resolve(raw_config: dict[str, Any], source: str = "config.json"):
    """Returns (model class, parsed config) for a raw config.json dict."""
    archs = raw_config.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise ValueError(f"{source}: no 'architectures' field; supported: {', '.join(supported_architectures())}")
    for arch in archs:
        if arch in _ARCHITECTURES:
            module, model_cls, config_cls = _ARCHITECTURES[arch]
            mod = importlib.import_module(module)
            return getattr(mod, model_cls), getattr(mod, config_cls).from_dict(raw_config, source)
    raise ValueError(
        f"{source}: unknown architecture {', '.join(map(str, archs))}; "
        f"supported: {', '.join(supported_architectures())}"
    )
