"""Optimizers over sharded parameters. Under FSDP2 a parameter is a DTensor whose local tensor holds this rank's
rows; elementwise arithmetic runs on the local rows as is, while a statistic over the whole tensor (Stable-SPAM's
max |g| and ||g||) is reduced across the shards with one all-reduce.

Two traps this module avoids: `.item()` on a reduction of a DTensor returns only the local shard's value, and
`.full_tensor()` is a collective that hangs unless every rank calls it. The optimizers here call `shard_group`
and `all_reduce_` for every parameter in the same order on every rank, so the collectives always pair up.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's entries of t as a flat view (writes go to the parameter or state): the local shard of a
    DTensor, or the whole tensor."""
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.view(-1)


def shard_group(p: torch.Tensor):
    """The process group over which p's entries are spread, or None when this rank holds all of p."""
    if not isinstance(p, DTensor) or all(isinstance(pl, Replicate) for pl in p.placements):
        return None
    if p.device_mesh.ndim != 1:
        raise NotImplementedError("per-tensor statistics support a 1-D device mesh (FSDP2 data parallel)")
    return p.device_mesh.get_group()


def local_max(x: torch.Tensor) -> torch.Tensor:
    """max of x, 0 for an empty shard (valid for x >= 0: FSDP2 leaves some ranks no rows of a small tensor)."""
    return x.max() if x.numel() else x.new_zeros(())


def all_reduce_(t: torch.Tensor, op: str, group) -> torch.Tensor:
    """In-place all-reduce (op "max" or "sum") of a small tensor over group; returns t."""
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t
