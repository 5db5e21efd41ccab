"""llada-serve: an OpenAI-compatible server for masked diffusion LMs.

``server.LLM`` is the offline API; it is imported lazily so that the API
layer (``server.api``), which never imports torch, can import this package.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from server.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'server' has no attribute {name!r}")
