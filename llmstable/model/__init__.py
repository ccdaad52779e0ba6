"""The LLaMA-style decoder and its builder."""

from __future__ import annotations

import dataclasses

import torch

from llmstable.model.llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig", "build_model", "llama_config"]


def llama_config(model_cfg, vocab_size: int) -> LlamaConfig:
    """The model group's config -> LlamaConfig, with the vocabulary size filled in from the tokenizer
    when the model file leaves it null."""
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    values = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k in fields}
    values["vocab_size"] = model_cfg.vocab_size or vocab_size
    return LlamaConfig(**values)


def build_model(cfg: LlamaConfig, device: torch.device | str = "cpu") -> Llama:
    """Build and initialise the model on `device` (init happens on CPU first, so the weights for a given
    seed are the same on every device)."""
    return Llama(cfg).to(device)
