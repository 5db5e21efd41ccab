"""Fused GPU kernels for masked-diffusion decoding and their torch twins.

Kept deliberately light: Hugging Face transformers probes the import name
``kernels`` (its own optional package) and must not take this one for it, so
this module defines no ``__version__`` and imports nothing heavy. Import the
ops from ``kernels.ops``.
"""
