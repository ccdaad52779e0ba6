"""Running on several processes with existing engines: DDP and FSDP2 (torch), DeepSpeed ZeRO. See `world` for
process groups and `engines` for how each engine steps and checkpoints."""

from llmstable.parallel.build import build_engine, engine_class
from llmstable.parallel.engines import DDPEngine, Engine, FSDP2Engine
from llmstable.parallel.world import World, init_world

__all__ = ["DDPEngine", "Engine", "FSDP2Engine", "World", "build_engine", "engine_class", "init_world"]
