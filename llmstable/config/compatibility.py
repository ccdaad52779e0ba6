"""What runs together: the rules between the engine, the optimizer, the stabilizers and `train.compile`, written
against what each declares (llmstable.config.engines for engines, the class attributes of the optimizer and
stabilizer schemas), never against names. A new engine or optimizer is covered by these rules as soon as it
declares its traits; each message names the keys, the reason, and the way out.
"""

from __future__ import annotations

from llmstable.config.engines import ENGINES, EngineTraits, engine_traits
from llmstable.config.optimizer import OptimizerConfig


def compatibility_problems(cfg, problems: list[str]) -> None:
    """Append a problem for each combination in `cfg` (a TrainConfig) that cannot run as asked."""
    d = cfg.distributed
    engine = engine_traits(d)
    if engine is None:
        return  # (DistributedConfig.validate names the unknown engine)
    where = f"distributed={d.name}" + (f" with distributed.zero_stage={d.zero_stage}" if engine.zero_stages else "")
    optimizer_problems(cfg.optimizer, engine, where, problems)
    stabilizer_problems(cfg.stabilizer, cfg.optimizer, engine, where, problems)
    if cfg.train.compile is True and not engine.can_compile:
        problems.append(f"train.compile=true cannot take effect under {where}: the engine wraps the module itself, so "
                        "llmstable cannot compile it. Use train.compile=auto or false (eager), or an engine that "
                        f"compiles ({', '.join(compiling_engines())})")


def optimizer_problems(opt, engine: EngineTraits, where: str, problems: list[str]) -> None:
    whole = [n for n, t in _engines() if t.whole_tensors and not t.wraps_optimizer]
    if opt.whole_tensors and not engine.whole_tensors:
        problems.append(f"optimizer={opt.name} cannot run under {where}: {opt.whole_tensors}, and under "
                        f"distributed={engine.name} the optimizer would see {_view(engine)}. Use "
                        f"distributed={' or distributed='.join(whole)}")
    elif not opt.engine_client and engine.wraps_optimizer:
        problems.append(f"optimizer={opt.name} is not supported under {where}, which keeps its own copies of the "
                        f"optimizer's state. Use optimizer=adamw there, or distributed={' or distributed='.join(whole)}")
    if opt.tensor_statistics and engine.flat_partitions:
        problems.append(f"optimizer={opt.name} cannot run under {where}: the engine hands the optimizer flat "
                        f"partitions that mix many tensors, so {opt.tensor_statistics} would be wrong. Use "
                        "distributed=fsdp2 (exact per-tensor statistics over the sharded tensors), distributed=ddp, "
                        "or distributed.zero_stage=0")
    if opt.global_step and engine.flat_partitions:
        problems.append(f"optimizer={opt.name} cannot run under {where}: the engine steps the optimizer one parameter "
                        f"group at a time, so {opt.global_step}. Use distributed=fsdp2, distributed=ddp, or "
                        "distributed.zero_stage=0")
    if not opt.dtensor_ready and engine.shards_params and not engine.flat_partitions:
        problems.append(f"optimizer={opt.name} with optimizer.backend={getattr(opt, 'backend', None)} fails on the "
                        f"DTensor parameters of {where}: set optimizer.backend=torchao (DTensor-aware) or use "
                        "distributed=ddp")


def stabilizer_problems(stabilizers, opt, engine: EngineTraits, where: str, problems: list[str]) -> None:
    chosen = {name: getattr(stabilizers, name) for name in stabilizers.active()}
    step_hooks = [name for name, c in chosen.items() if getattr(c, "step_hooks", False)]
    if step_hooks and engine.fused_step:
        problems.append(
            f"stabilizer={step_hooks} cannot run under {where}: the engine reduces, clips and updates inside "
            "backward, so there is no point between the gradients and the update, or right after the update, where "
            "they could act. Use distributed=fsdp2 or distributed=ddp")
    for name, c in chosen.items():
        if getattr(c, "whole_params_in_forward", False) and engine.replaces_params:
            problems.append(f"stabilizer={name} is not supported under {where}, which partitions the parameters "
                            "outside forward: use distributed=fsdp2 (tested) or distributed.zero_stage<=2")
    guard = stabilizers.spike_guard
    if guard is None:
        return
    warnings = [m for m in guard.watch if m.startswith("precond")]
    if warnings and not opt.adam_like:
        adam_like = [n for n, v in _optimizers() if v.adam_like is True]
        problems.append(f"stabilizer.spike_guard.watch={warnings} reads Adam's second moment, which "
                        f"optimizer={opt.name} does not keep: use one of {', '.join(adam_like)} or drop it")
    if warnings and not (engine.whole_tensors and not engine.fused_step):
        problems.append(f"stabilizer.spike_guard.watch={warnings} needs whole gradients and optimizer states beside "
                        f"each other, which {where} shards or fuses: use distributed=ddp or single, or drop it")
    if guard.replay and engine.fused_step:
        problems.append(f"stabilizer.spike_guard.replay=true cannot run under {where}, which updates inside "
                        "backward before a step could be replayed: use ddp or fsdp2")


def compiling_engines() -> list[str]:
    return [name for name, t in _engines() if t.can_compile]


def _view(engine: EngineTraits) -> str:
    return "flat partitions that mix tensors" if engine.flat_partitions else "shards"


def _engines() -> list[tuple[str, EngineTraits]]:
    return list(ENGINES.items())


def _optimizers() -> list[tuple[str, type]]:
    return list(OptimizerConfig.variants.items())
