"""Building the engine a run asks for: the class its traits name (llmstable.config.engines) is imported, and its
`build` wraps or shards the model from outside, then builds the optimizer over the result. DeepSpeed is imported
only when it is asked for."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from llmstable.config.engines import engine_traits
from llmstable.parallel.engines import Engine
from llmstable.parallel.world import World


def engine_class(distributed) -> type[Engine]:
    """The Engine subclass a DistributedConfig chooses (imported on demand)."""
    module, name = engine_traits(distributed).target.split(":")
    return getattr(importlib.import_module(module), name)


def build_engine(cfg, world: World, model: torch.nn.Module, make_optimizer, run_dir: Path) -> Engine:
    """Wrap or shard the model for cfg.distributed and build the optimizer over the result; the engine carries the
    traits of the run's config (its ZeRO stage applied)."""
    engine = engine_class(cfg.distributed).build(cfg, world, model, make_optimizer, run_dir)
    engine.traits = engine_traits(cfg.distributed)
    return engine
