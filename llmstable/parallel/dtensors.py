"""Tensors that may be DTensor shards (FSDP2): reducing them to a plain tensor over the whole (`full`, a collective),
giving a plain scalar the form that combines with a shard (`replicated_like`), and the norms of many blocks of
tensors with one collective in all (`block_norms`). Every rank calls them alike."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate


def full(t: torch.Tensor) -> torch.Tensor:
    """A reduction over a DTensor as a plain tensor over the whole (a collective every rank reaches alike)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def replicated_like(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A plain tensor t (the same on every rank) in a form that combines with x: replicated over x's mesh when x is
    a DTensor shard (no communication), t itself otherwise."""
    if isinstance(x, DTensor):
        return DTensor.from_local(t, x.device_mesh, [Replicate()] * x.device_mesh.ndim, run_check=False)
    return t


def block_norms(blocks: list[list[torch.Tensor]]) -> torch.Tensor:
    """The norm of each block's tensors together, as one fp32 device tensor (L,) (no host sync).

    Plain tensors: the norm of the per-tensor norms. DTensor shards (FSDP2): each rank sums its shards' squared
    norms per block, then one all-reduce per sharded mesh dimension adds them up (one in all for FSDP2's 1-D mesh,
    whatever the number of blocks and tensors; replicated dimensions, as HSDP's, hold the same values and are not
    summed). The per-tensor `full` this replaces cost one collective per tensor."""
    if not any(isinstance(t, DTensor) for tensors in blocks for t in tensors):
        return torch.stack([torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32)
                                                                  for t in tensors])) for tensors in blocks])
    squares: dict = {}  # (mesh, placements) -> (L,) local sums of squared norms; None -> plain tensors' (L,)
    for i, tensors in enumerate(blocks):
        for t in tensors:
            key = (t.device_mesh, tuple(t.placements)) if isinstance(t, DTensor) else None
            local = t.to_local() if key is not None else t
            if key not in squares:
                squares[key] = local.new_zeros(len(blocks), dtype=torch.float32)
            squares[key][i] += torch.linalg.vector_norm(local, dtype=torch.float32).square()
    for key, sums in squares.items():  # (the same keys in the same order on every rank: the model is the same)
        if key is not None:
            mesh, placements = key
            if any(pl.is_partial() for pl in placements):
                raise ValueError(f"block_norms: a tensor placed as {placements}: a partial sum has no norm until "
                                 "it is reduced")
            for dim, pl in enumerate(placements):
                if not pl.is_replicate():  # Shard, and FSDP2 + TP's strided shard
                    torch.distributed.all_reduce(sums, group=mesh.get_group(dim))
    return torch.stack(list(squares.values())).sum(0).sqrt()
