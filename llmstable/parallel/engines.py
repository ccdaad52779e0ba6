"""Engines: how the model and optimizer are spread over the ranks, how one optimizer step runs there, and how
their state is checkpointed. The trainer calls the same few methods whatever the engine:

    engine.set_sync(last)            before each micro-batch's forward: reduce gradients only on the last one
    engine.backward(loss, accum)     one micro-batch's backward
    engine.clip_grad_norm_(max_norm) the global pre-clip gradient norm, clipping when max_norm is finite
    engine.step(); engine.zero_grad()
    engine.save(dir) / engine.load(dir, meta)   every rank calls them (they may be collectives)

and asks it what it can do instead of its name: its `traits` (llmstable.config.engines: `fused_step`, clipping
and the update inside backward, so an update cannot be skipped or replayed; `can_compile`; `can_snapshot`;
`checkpoint_format`; what the optimizer sees), `full_state_dict()`, `optimizer_metrics()`, `optimizer_events()`,
`checkpoint_meta()`. An engine is built by its class's `build` (the builder imports the class its traits name).

Parallelism is applied from outside: the model file never imports torch.distributed.

Checkpoint formats (`meta["format"]` in state.json):
- `safetensors` (single, ddp): rank 0 writes model.safetensors and optimizer.pt (every rank holds the same).
- `dcp` (fsdp2): `dcp/`, sharded by torch.distributed.checkpoint; loads on any number of ranks, or on one
  process with no engine at all (its tensors are resharded on load).
- `deepspeed`: DeepSpeed's own files under `deepspeed/` (see llmstable.parallel.deepspeed).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llmstable.checkpoint import CheckpointError
from llmstable.config.engines import ENGINES, EngineTraits
from llmstable.optimizers.counting import extra_state, extra_state_key, load_extra_state
from llmstable.parallel.world import World
from llmstable.tensorfiles import load_weights_only

DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: FSDP2 keeps the parameters' own dtype


class Engine:
    """One process, or every rank holding everything (the base of DDP). What it is and allows is its `traits`,
    declared in llmstable.config.engines (the builder sets the ones of the run's config, ZeRO stage applied)."""

    traits: EngineTraits = ENGINES["single"]

    def __init__(self, world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.world, self.model, self.optimizer = world, model, optimizer
        self.module: torch.nn.Module = model  # what forward is called on

    @classmethod
    def build(cls, cfg, world: World, model: torch.nn.Module, make_optimizer, run_dir: Path) -> Engine:
        """Wrap or shard the model as the engine needs, then build the optimizer over the result."""
        return cls(world, model, make_optimizer(model))

    name = property(lambda self: self.traits.name)
    checkpoint_format = property(lambda self: self.traits.checkpoint_format)
    fused_step = property(lambda self: self.traits.fused_step)  # clipping and the update inside backward
    can_compile = property(lambda self: self.traits.can_compile)  # torch.compile may wrap the forward
    can_snapshot = property(lambda self: self.traits.can_snapshot)  # checkpoint via snapshot() in the background

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that holds the moments (zeroed by the spike guard) and reports metrics."""
        return self.optimizer

    def optimizer_metrics(self) -> dict[str, float]:
        """The optimizer's own metrics since the last call (SPAM and Stable-SPAM report some)."""
        metrics = getattr(self.base_optimizer, "metrics", None)
        return metrics() if callable(metrics) else {}

    def optimizer_events(self) -> list[dict]:
        """The optimizer's events since the last call (e.g. momentum resets)."""
        pop = getattr(self.base_optimizer, "pop_events", None)
        return pop() if callable(pop) else []

    def checkpoint_meta(self) -> dict:
        """What a checkpoint records about the engine that wrote it (state.json's `engine` entry)."""
        return {"name": self.name, "format": self.checkpoint_format, "world_size": self.world.world_size,
                "zero_stage": None}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """On rank 0, every weight as a plain tensor (a collective for sharded engines); None on other ranks."""
        return self.model.state_dict() if self.world.is_main else None

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):  # torchao's optimizers keep lr as a tensor and refuse a float
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def set_sync(self, last: bool) -> None:
        pass

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        (loss / accum).backward()

    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm if max_norm is not None else float("inf"))

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # --- checkpoints -------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_model

        if self.world.is_main:
            save_model(self.model, str(directory / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def snapshot(self) -> dict:
        """What save() writes, copied to CPU memory in one blocking pass (llmstable.snapshot); every rank takes it
        (the rollback ring restores it on every rank), rank 0 writes it."""
        from llmstable.snapshot import model_snapshot, to_host

        pin = self.world.device.type == "cuda"
        snap = {"model": model_snapshot(self.model, pin), "optimizer": to_host(self.optimizer.state_dict(), pin)}
        if pin:
            torch.cuda.synchronize(self.world.device)  # the non-blocking copies have landed
        return snap

    def write_snapshot(self, directory: Path, snap: dict) -> None:
        """(Rank 0, any thread.) The files save() writes, from a snapshot: the same bytes."""
        from llmstable.snapshot import write_model

        write_model(directory, snap["model"])
        torch.save(snap["optimizer"], directory / "optimizer.pt")

    def restore_snapshot(self, snap: dict) -> None:
        """Model and optimizer as of a snapshot, with the values a load of its files would give."""
        from llmstable.snapshot import copied, restore_model

        restore_model(self.model, snap["model"])
        self.optimizer.load_state_dict(copied(snap["optimizer"]))

    def readers(self) -> dict:
        """Checkpoint format -> the function that loads it into this engine's model and optimizer."""
        return {"safetensors": load_safetensors, "dcp": load_dcp}

    def load(self, directory: Path, meta: dict) -> None:
        fmt = meta.get("format", "safetensors")
        reader = self.readers().get(fmt)
        if reader is None:
            raise CheckpointError(cannot_load(directory, fmt, self.name))
        reader(directory, self.model, self.optimizer)


class DDPEngine(Engine):
    """torch DistributedDataParallel: whole replicas, gradients all-reduced in backward."""

    traits = ENGINES["ddp"]

    def __init__(self, world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__(world, model, optimizer)
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        # Buffers (the RoPE tables) are the same on every rank by construction: no sync per forward (DDP still
        # broadcasts them once, at init).
        self.module = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    def set_sync(self, last: bool) -> None:
        self.module.require_backward_grad_sync = last  # what no_sync() toggles, without a context manager


class FSDP2Engine(Engine):
    """torch FSDP2: `fully_shard` on every transformer block, then on the root. Parameters become DTensors sharded
    along dim 0; mixed precision follows distributed.param_dtype / reduce_dtype."""

    traits = ENGINES["fsdp2"]  # (can_snapshot false: DCP writes every rank's shards with collectives)

    @classmethod
    def build(cls, cfg, world: World, model: torch.nn.Module, make_optimizer, run_dir: Path) -> FSDP2Engine:
        model = cls.shard(model, world, cfg.distributed)
        return cls(world, model, make_optimizer(model))

    @staticmethod
    def shard(model: torch.nn.Module, world: World, cfg) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(world.device.type, (world.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
        return model

    def set_sync(self, last: bool) -> None:
        self.model.set_requires_gradient_sync(last)

    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # a collective: every rank reaches it in the same step
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.world.is_main else None

    def save(self, directory: Path) -> None:
        save_dcp(directory, self.model, self.optimizer)

    def readers(self) -> dict:
        return {"dcp": load_dcp, "safetensors": load_full_into_sharded}


def cannot_load(directory: Path, fmt: str, engine: str) -> str:
    return (f"{directory} holds a {fmt!r} checkpoint, which distributed={engine} cannot resume: resume it with the "
            f"engine that wrote it (see state.json's engine entry), or start a new run from its weights with "
            f"`llmstable export` and train.init_from")


# --- the formats -----------------------------------------------------------------------------------------------


def load_safetensors(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    from safetensors.torch import load_model

    check_fits(directory, model)
    missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / 'model.safetensors'} does not fit the model: missing {sorted(missing)}, unexpected "
            f"{sorted(unexpected)}. Was it written with another model config?"
        )
    if optimizer is not None:
        load_optimizer(directory, optimizer, load_weights_only(directory / "optimizer.pt", NOT_OURS))


NOT_OURS = ("Resume from another checkpoint (resume=PATH), or start a new run from this one's weights: llmstable "
            "export on it, then train.init_from=OUT/model.safetensors in a new run_dir")
MISFIT = ("A run resumes only onto a model whose every tensor keeps its shape, resume_force=true included (a changed "
          "vocabulary or model size does not): resume with the config the checkpoint was written with, or start a "
          "new run_dir (train.init_from takes weights that fit)")


def check_fits(directory: Path, model: torch.nn.Module) -> None:
    """Compare the shapes in model.safetensors' header with the model's before loading (torch would stop at the
    first with a size-mismatch traceback)."""
    from llmstable.tensorfiles import describe_misfit, fit_problems, safetensors_shapes

    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    wrong = [p for p in fit_problems(safetensors_shapes(directory / "model.safetensors"), own)
             if "is not a parameter" not in p]  # (names are load_model's to report)
    if wrong:
        raise CheckpointError(f"checkpoint {directory} does not fit the model this config builds: "
                              f"{describe_misfit(wrong)}. {MISFIT}")


def load_optimizer(directory: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, with the checkpoint named when its state belongs to another optimizer or model."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{directory / 'optimizer.pt'} holds the state of another optimizer or model "
                              f"({type(err).__name__}: {str(err)[:200]}). {MISFIT}") from err


def save_dcp(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer into directory/dcp (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
    )

    if not optimizer.state:  # before the first step: nothing to save, and get_state_dict would take a fake step
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(directory / "dcp"))
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    if (counters := extra_state(optimizer)) is not None:  # SPAM / Stable-SPAM global counters (same on every rank)
        state["optim_counters"] = counters
    dcp.save(state, checkpoint_id=str(directory / "dcp"))


def load_dcp(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load directory/dcp into model (and optimizer), whatever the number of ranks that wrote it: DCP reshards
    to the tensors asked for, DTensor shards or whole tensors in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    source = directory / "dcp"
    if not (source / ".metadata").is_file():
        raise CheckpointError(f"{source}/.metadata is missing: {directory} is not a complete DCP checkpoint")
    saved_keys = dcp.FileSystemReader(str(source)).read_metadata().state_dict_metadata
    if optimizer is None or not any(k.startswith("optim.") for k in saved_keys):  # (saved before any step)
        state = {"model": get_model_state_dict(model)}
        _read_dcp(state, source)
        set_model_state_dict(model, state["model"])
        return
    counters = extra_state(optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)  # (creates the optimizer state to load into)
    state = {"model": model_state, "optim": optim_state}
    if counters is not None:
        state["optim_counters"] = counters
    _read_dcp(state, source)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if counters is not None:
        load_extra_state(optimizer, state["optim_counters"])  # (and the initialising step's events dropped)


def _read_dcp(state: dict, source: Path) -> None:
    """dcp.load into state; in one process (export, generate, a resume on one rank) without torch's warning that it
    assumes one process: that is the intent."""
    import torch.distributed.checkpoint as dcp

    one_process = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=str(source), no_dist=one_process)


def load_full_into_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A single-process checkpoint (model.safetensors + optimizer.pt) into a sharded model: every rank reads the
    whole file and keeps its shards. The optimizer state is keyed by parameter order, which the sharded optimizer
    shares (same param groups, same model order)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    check_fits(directory, model)
    full = load_file(str(directory / "model.safetensors"))
    saved = load_weights_only(directory / "optimizer.pt", NOT_OURS)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    osd = {"state": {order[i]: v for i, v in saved["state"].items()},
           "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    extra = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}
    set_state_dict(model, optimizer, model_state_dict=full, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))
    key = extra_state_key(optimizer)
    if key is not None and key in extra:
        load_extra_state(optimizer, extra[key])
