"""The LLaMA-style decoder (llama.py), its builder, and its parameters' roles (roles.py); its shape, `LlamaConfig`,
is part of the config schema (llmstable.config.model).

Importing the package does not import torch: `LlamaConfig` is plain, and the rest loads on first use.
"""

from __future__ import annotations

from llmstable.config.model import LlamaConfig

__all__ = ["Llama", "LlamaConfig", "build_model", "llama_config"]


def __getattr__(name: str):
    if name in ("Llama", "build_model", "llama_config"):
        from llmstable.model import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'llmstable.model' has no attribute {name!r}")
