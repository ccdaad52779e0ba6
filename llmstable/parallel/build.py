"""Building the engine a run asks for (`distributed.name`): the model is wrapped or sharded from outside, then the
optimizer is built over the result. DeepSpeed is imported only when it is asked for."""

from __future__ import annotations

from pathlib import Path

import torch

from llmstable.parallel.engines import DDPEngine, Engine, FSDP2Engine
from llmstable.parallel.world import World


def engine_class(name: str) -> type[Engine]:
    """The engine class of `distributed.name`: what it can do is readable before it is built (the stabilizers are
    built first, and told what they may ask for)."""
    if name == "deepspeed":
        from llmstable.parallel.deepspeed import DeepSpeedEngine  # (deepspeed itself is imported on build)

        return DeepSpeedEngine
    return {"single": Engine, "ddp": DDPEngine, "fsdp2": FSDP2Engine}[name]


def build_engine(cfg, world: World, model: torch.nn.Module, make_optimizer, run_dir: Path) -> Engine:
    """Wrap or shard the model for cfg.distributed and build the optimizer over the result."""
    cls = engine_class(cfg.distributed.name)
    if cls is FSDP2Engine:
        model = FSDP2Engine.shard(model, world, cfg.distributed)
        return FSDP2Engine(world, model, make_optimizer(model))
    if cls.name == "deepspeed":
        return cls.build(cfg, world, model, make_optimizer(model), run_dir)
    return cls(world, model, make_optimizer(model))
