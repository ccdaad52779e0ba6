"""Start a real multi-process run the way a launcher would, but listening on loopback only: processes come from
torch.multiprocessing and meet through a `file://` store (no TCP listener), and none outlives the call."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp

from llmstable.parallel.world import INIT_METHOD_ENV


def _rank_main(rank: int, world_size: int, init_file: str, overrides: list[str], run_dir: str,
               slow_checkpoint_s: float = 0.0) -> None:
    if slow_checkpoint_s and rank == 0:  # rank 0's checkpoint writes take this much longer (a large model's would)
        from llmstable import checkpoint

        write = checkpoint.write_snapshot

        def slow_write(*args, **kwargs):
            time.sleep(slow_checkpoint_s)
            return write(*args, **kwargs)

        checkpoint.write_snapshot = slow_write
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    os.environ[INIT_METHOD_ENV] = f"file://{init_file}"
    os.environ.pop("MASTER_ADDR", None)
    import torch

    torch.set_num_threads(1)
    from llmstable.compose import compose_config
    from llmstable.trainer import train

    train(compose_config(overrides, run_dir=run_dir))


def run_ranks(world_size: int, overrides: list[str], run_dir: Path, timeout_s: float = 600,
              slow_checkpoint_s: float = 0.0, grace_s: float | None = None) -> None:
    """Train `overrides` on world_size processes; raises mp.ProcessExitedException / ProcessRaisedException if a
    rank dies or fails (the others get SIGTERM, then SIGKILL after `grace_s`, 30 s by default, as under
    torchrun)."""
    with tempfile.TemporaryDirectory(prefix="llmstable-pg-") as tmp:
        init_file = os.path.join(tmp, "store")
        ctx = mp.start_processes(_rank_main, args=(world_size, init_file, list(overrides), str(run_dir),
                                                   slow_checkpoint_s),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            # (join: False while some rank still runs)
            while not ctx.join(timeout=max(deadline - time.monotonic(), 0), grace_period=grace_s):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"ranks still running after {timeout_s} s")
        finally:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
                process.join()
