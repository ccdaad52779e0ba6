"""What each engine (`distributed.name`) is and allows, as data the config layer reads without torch.

The config checks, the builders and the trainer ask an engine's traits, never its name: a rule such as "an
optimizer that needs whole tensors cannot run where the optimizer sees shards" then covers every engine, the next
one included. An engine registers its traits with `register_engine`, naming the class that implements it
(`target`, imported only when the engine is built); that registration is all the config layer needs to know.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineTraits:
    name: str
    target: str  # "module:Class" of the llmstable.parallel.Engine subclass, imported when the engine is built
    describe: str = ""  # for messages: what the engine is
    fused_step: bool = False  # clipping and the update happen inside backward: no hook between gradients and update
    shards_params: bool = False  # parameters and optimizer state are sharded DTensors (the optimizer sees shards)
    flat_partitions: bool = False  # the optimizer steps flat partitions that mix tensors, one param group at a time
    replaces_params: bool = False  # parameters are partitioned placeholders outside forward (ZeRO-3)
    wraps_optimizer: bool = False  # the engine keeps its own fp32 copies of the optimizer state (DeepSpeed)
    holds_whole_model: bool = True  # every rank holds every weight as built (not sharded, cast or partitioned)
    can_compile: bool = True  # torch.compile may wrap the module it trains
    can_snapshot: bool = True  # its checkpoint can be copied to CPU memory and written in the background
    checkpoint_format: str = "safetensors"
    checkpoint_files: tuple[str, ...] = ("model.safetensors", "optimizer.pt")  # what its loader reads ("x/": a folder)
    pickled_checkpoint: bool = False  # its checkpoint files are read with pickle (so they need the trust check)
    process_group: bool = True  # runs in a torch.distributed process group (a world of one without a launcher)
    zero_stages: bool = False  # the traits above depend on distributed.zero_stage (see engine_traits)
    config_file_key: str | None = None  # the distributed.* key of a config file the engine reads, if it reads one

    @property
    def whole_tensors(self) -> bool:
        """Whether the optimizer steps whole tensors (not shards, not flat partitions)."""
        return not (self.shards_params or self.flat_partitions)



ENGINES: dict[str, EngineTraits] = {}


def register_engine(traits: EngineTraits) -> EngineTraits:
    """Make `distributed=NAME` (and `distributed.name=NAME`) choose this engine."""
    ENGINES[traits.name] = traits
    return traits


def checkpoint_format(name: str) -> EngineTraits | None:
    """The traits of an engine that writes checkpoint format `name` (the files its loader reads, whether they are
    pickled), or None for a format no engine writes."""
    return next((t for t in ENGINES.values() if t.checkpoint_format == name), None)


def engine_traits(distributed) -> EngineTraits | None:
    """The traits of the engine a DistributedConfig chooses, with its ZeRO stage applied; None for an unknown name."""
    traits = ENGINES.get(distributed.name)
    if traits is None or not traits.zero_stages:
        return traits
    stage = distributed.zero_stage
    return dataclasses.replace(traits, flat_partitions=stage >= 1, replaces_params=stage == 3)


register_engine(EngineTraits("single", "llmstable.parallel.engines:Engine", "one process", process_group=False))
register_engine(EngineTraits("ddp", "llmstable.parallel.engines:DDPEngine", "whole replicas, gradients all-reduced"))
register_engine(EngineTraits("fsdp2", "llmstable.parallel.engines:FSDP2Engine", "parameters sharded as DTensors",
                             shards_params=True, holds_whole_model=False, can_snapshot=False,
                             checkpoint_format="dcp", checkpoint_files=("dcp/.metadata",), pickled_checkpoint=True))
register_engine(EngineTraits("deepspeed", "llmstable.parallel.deepspeed:DeepSpeedEngine", "DeepSpeed ZeRO",
                             fused_step=True, wraps_optimizer=True, holds_whole_model=False, can_compile=False,
                             can_snapshot=False, checkpoint_format="deepspeed", checkpoint_files=("deepspeed/",),
                             pickled_checkpoint=True, zero_stages=True, config_file_key="deepspeed_config"))
