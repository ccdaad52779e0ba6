"""DeepSpeed ZeRO as an engine. llmstable's optimizer (from the `optimizer` group) is the client optimizer, and
the DeepSpeed JSON is generated from the run's config, so batch sizes, clipping, precision and the ZeRO stage
have one source of truth; `distributed.deepspeed_config` may add or override other keys (not the batch keys).

What ZeRO changes for llmstable:
- from stage 1 on, the client optimizer steps flat fp32 partitions that mix many tensors, so per-tensor
  statistics (Stable-SPAM) are impossible there; and ZeRO steps it one parameter group at a time, so an
  optimizer with a global step (SPAM, Stable-SPAM) would count each step once per group. The config check
  refuses both at stages 1-3; AdamW is elementwise with per-tensor step counts and exact;
- DeepSpeed clips and updates inside its own step, after the last micro-batch's backward. The spike guard
  therefore sees each step after its update, and a spiky step is rolled back (the update is undone with
  everything else) rather than skipped;
- checkpoints are DeepSpeed's own (`deepspeed/` in the checkpoint). Resumed on another number of ranks, a
  ZeRO 1-3 checkpoint is first converted to DeepSpeed's universal format (`ds_to_universal`), which
  DeepSpeed then loads on the new layout. DeepSpeed reads its files with `weights_only=False`; every read here
  runs inside `trust.weights_only_loads()`, torch's restricted unpickler with DeepSpeed's few data classes
  allowed, and the checkpoint must also pass the trust check (llmstable.trust).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from llmstable.checkpoint import CheckpointError
from llmstable.config.engines import ENGINES
from llmstable.config import ConfigError
from llmstable.trust import weights_only_loads
from llmstable.optimizers.counting import extra_state, load_extra_state
from llmstable.parallel.engines import Engine, cannot_load
from llmstable.parallel.world import World

TAG = "state"
EXTRA = "optimizer_extra.json"
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")  # before deepspeed loads
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON for this run, with the user's override file merged in."""
    t = cfg.train
    accum = t.global_batch_size // (t.micro_batch_size * world_size)
    generated = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.max_norm if t.max_norm is not None else 0.0,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # the client optimizer is llmstable's
        "steps_per_print": 2**31 - 1,  # llmstable logs
        "wall_clock_breakdown": False,
    }
    if cfg.distributed.deepspeed_config is None:
        return generated
    path = cfg.distributed.deepspeed_config
    try:
        override = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError([f"distributed.deepspeed_config={path!r} is not readable JSON: {err}"]) from err
    clashes = [k for k in BATCH_KEYS if k in override and override[k] != generated[k]]
    if clashes:
        raise ConfigError([
            f"distributed.deepspeed_config={path!r} sets {k}={override[k]} but the llmstable config gives "
            f"{generated[k]}: remove {k} from the JSON and set train.global_batch_size / train.micro_batch_size"
            for k in clashes
        ])
    return _merge(generated, override)


def skip_inference_comm_op() -> None:
    """On CPU, tell DeepSpeed not to build its shared-memory all-reduce. DeepSpeed compiles that C++ op (about a
    minute on 2 cores, once per environment) when its communication backend starts, but only its inference kernels
    call it (`inference_all_reduce`, for tensor-parallel inference); ZeRO's collectives go through torch.distributed
    (gloo here), so training runs the same without it. Marking the op incompatible is the switch DeepSpeed's
    `build_shm_op` reads (`deepspeed.ops.__compatible_ops__`, a dict kept in the module so that edits persist, as
    its code says). Checked against deepspeed 0.19.8 (tests/parallel/test_engine_config.py)."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedEngine(Engine):
    traits = ENGINES["deepspeed"]  # (fused_step; no compile: DeepSpeed wraps the module; no snapshot: its own files)

    def __init__(self, world: World, model: torch.nn.Module, ds_engine, stage: int, run_dir: Path):
        super().__init__(world, model, ds_engine.optimizer)
        self.ds, self.stage, self.run_dir = ds_engine, stage, run_dir
        self.module = ds_engine

    @classmethod
    def build(cls, cfg, world: World, model: torch.nn.Module, make_optimizer, run_dir: Path) -> DeepSpeedEngine:
        import deepspeed

        optimizer = make_optimizer(model)
        skip_inference_comm_op()
        config = deepspeed_config(cfg, world.world_size)
        if world.is_main:
            (run_dir / "deepspeed_config.json").write_text(json.dumps(config, indent=1))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                               dist_init_required=False)
        # DeepSpeed caches the groups it makes; its own teardown releases them, so a later world in this process
        # (a sweep, a notebook, the tests) does not meet a stale group.
        world.destroy = deepspeed.comm.destroy_process_group
        return cls(world, model, engine, config["zero_optimization"]["stage"], run_dir)

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)  # ZeRO wraps the client optimizer

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "zero_stage": self.stage}

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        self.ds.backward(loss)  # scales by 1 / gradient_accumulation_steps itself
        self.ds.step()  # a no-op except after the last micro-batch, where it reduces, clips and updates

    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        norm = self.ds.get_global_grad_norm()  # of the step just taken, before its clipping
        return torch.as_tensor(norm if norm is not None else 0.0, dtype=torch.float32)

    def step(self) -> None:
        pass  # done in backward

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes its gradients after each update

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        else:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return state if self.world.is_main else None

    def save(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory / "deepspeed"), tag=TAG, save_latest=False)
        if self.world.is_main:  # what ZeRO's files drop: SPAM's global counters, and (universal, ZeRO-3) the step
            (directory / EXTRA).write_text(json.dumps(optimizer_extra(self.base_optimizer)))

    def load(self, directory: Path, meta: dict) -> None:
        if meta.get("format") != self.checkpoint_format:
            raise CheckpointError(cannot_load(directory, meta.get("format", "safetensors"), self.name))
        source = directory / "deepspeed"
        saved_world, saved_stage = meta.get("world_size", 1), meta.get("zero_stage", self.stage)
        if saved_stage != self.stage:
            raise CheckpointError(f"{directory} was written with distributed.zero_stage={saved_stage}; resume it "
                                  f"with that stage (this run has {self.stage})")
        if saved_world == self.world.world_size or self.stage == 0:  # stage 0 keeps whole optimizer states
            self._load(source, universal=False)
            self.restore_extra(directory)
            return
        universal = self.run_dir / "checkpoints" / f".universal-{directory.name}"
        if self.world.is_main:
            with weights_only_loads():
                to_universal(source, universal)
        self.world.barrier()
        try:
            self._load(universal, universal=True)
            self.restore_extra(directory)
        finally:
            self.world.barrier()
            if self.world.is_main:
                shutil.rmtree(universal, ignore_errors=True)

    def _load(self, source: Path, universal: bool) -> None:
        self.ds._config.load_universal_checkpoint = universal
        try:
            with weights_only_loads():
                path, _ = self.ds.load_checkpoint(str(source), tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint {TAG!r} in {source}")

    def restore_extra(self, directory: Path) -> None:
        extra = directory / EXTRA
        if extra.is_file():
            set_optimizer_extra(self.base_optimizer, json.loads(extra.read_text()))


def optimizer_extra(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's step count and, for SPAM / Stable-SPAM, their global counters."""
    steps = [st["step"] for st in optimizer.state.values() if "step" in st]
    extra = {"step": float(steps[0]) if steps else None}
    if (counters := extra_state(optimizer)) is not None:
        extra["counters"] = counters
    return extra


def set_optimizer_extra(optimizer: torch.optim.Optimizer, extra: dict) -> None:
    if extra.get("step") is not None:
        for st in optimizer.state.values():
            if "step" in st:
                st["step"] = torch.full_like(st["step"], extra["step"]) if torch.is_tensor(st["step"]) else int(extra["step"])
    if "counters" in extra:
        load_extra_state(optimizer, extra["counters"])


def to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process: ZeRO partitions -> one folder per parameter."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main

    shutil.rmtree(target, ignore_errors=True)
    args = Namespace(input_folder=str(source / TAG), output_folder=str(target / TAG), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    main(args)
    (target / "latest_universal").write_text(TAG)


def read_deepspeed_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from a DeepSpeed checkpoint, in one process (for export)."""
    import pickle

    source = directory / "deepspeed"
    optim_files = list((source / TAG).glob("*optim_states.pt"))
    try:
        if optim_files:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with weights_only_loads():
                return dict(get_fp32_state_dict_from_zero_checkpoint(str(source), tag=TAG))
        with weights_only_loads():
            states = torch.load(source / TAG / "mp_rank_00_model_states.pt", map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{source} holds files that torch's weights-only loader refuses (objects besides "
                              f"tensors and DeepSpeed's own data classes): {str(err).splitlines()[0]}") from err
    return dict(states["module"])

