"""The processes of a run: who this rank is, its device, and the few collectives the trainer needs.

A launcher (`torchrun`, the `deepspeed` launcher, SLURM via torchrun) sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; `init_world` joins that process group. Tests start their processes with
`torch.multiprocessing` and set LLMSTABLE_INIT_METHOD to a `file://` URL, which needs no socket listener at all.
Started with no launcher, ddp, fsdp2 and deepspeed run as a world of one process (over a `file://` store in a
temporary folder), so the same engine and checkpoint format are used at every size.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmstable.config import ConfigError, DistributedConfig
from llmstable.config.engines import ENGINES, engine_traits

INIT_METHOD_ENV = "LLMSTABLE_INIT_METHOD"


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process initialised the process group, so it destroys it at the end
    store_dir: str | None = None  # the temporary folder of a world of one's file store
    env_set: tuple = ()  # the launcher variables a world of one set for itself (unset again on close)
    destroy: object = None  # how the group is destroyed: dist.destroy_process_group unless an engine needs its own

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """t averaged over the ranks (a new tensor; t itself is unchanged)."""
        return rank_mean(t)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of t over the ranks (a new tensor; t itself is unchanged)."""
        t = t.clone()
        if self.distributed and self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def broadcast(self, obj):
        """Rank 0's value of a picklable obj, on every rank."""
        if not self.distributed or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, clean: bool = True) -> None:
        """Barrier, then destroy the group (DeepSpeed ZeRO-3 can abort at exit without both). clean=False (after
        an error) skips the barrier, which the other ranks may never reach."""
        if self.owns_group and self.distributed:
            try:
                if clean:
                    dist.barrier()
            finally:
                (self.destroy or dist.destroy_process_group)()
            self.owns_group = False
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None
        for key in self.env_set:
            os.environ.pop(key, None)
        self.env_set = ()


def rank_mean(t: torch.Tensor) -> torch.Tensor:
    """t averaged over the ranks of the process group (a new tensor; t itself is unchanged), for code that holds no
    World (a stabilizer's hook); t's copy alone with one process."""
    t = t.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_world(cfg: DistributedConfig, device_name: str) -> World:
    """Join (or create) the process group that cfg and the launcher's environment describe."""
    world_size = launched_world_size()
    if not engine_traits(cfg).process_group:
        if world_size > 1:
            grouped = [name for name, t in ENGINES.items() if t.process_group]
            raise ConfigError([
                f"the launcher started {world_size} processes (WORLD_SIZE={world_size}) but distributed={cfg.name}, "
                f"which runs in one process: pass distributed={', distributed='.join(grouped)}"
            ])
        return World(device=_device(device_name, 0))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = _device(device_name, local_rank)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError([f"distributed.backend=nccl needs CUDA but train.device resolves to {device}: use "
                           "distributed.backend=gloo (or auto) on CPU"])
    if dist.is_initialized():  # an embedding program made the group already
        return World(rank, dist.get_world_size(), local_rank, device, owns_group=False)
    init_method, store_dir, env_set = os.environ.get(INIT_METHOD_ENV), None, ()
    if init_method is None and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        if world_size > 1:
            raise ConfigError([f"WORLD_SIZE={world_size} but no rendezvous: set MASTER_ADDR and MASTER_PORT (torchrun "
                               f"does) or {INIT_METHOD_ENV}=file:///shared/path"])
        store_dir = tempfile.mkdtemp(prefix="llmstable-pg-")  # a world of one: a file store, no socket
        init_method = "file://" + os.path.join(store_dir, "store")
        env_set = launcher_environment()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=cfg.timeout_s))
    return World(rank, world_size, local_rank, device, owns_group=True, store_dir=store_dir, env_set=env_set)


def launcher_environment() -> tuple[str, ...]:
    """For a world of one started without a launcher: the variables a launcher would set (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT on the loopback interface), which DeepSpeed asserts on. A
    variable already set (by a launcher or the user) is never overridden. Returns the names it set."""
    import socket

    values = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    if "MASTER_PORT" not in os.environ:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))  # (only to learn a free port; the process group itself uses a file store)
            values["MASTER_PORT"] = str(sock.getsockname()[1])
    set_here = tuple(key for key in values if key not in os.environ)
    for key in set_here:
        os.environ[key] = values[key]
    return set_here


def _device(name: str, local_rank: int) -> torch.device:
    from llmstable.device import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device
