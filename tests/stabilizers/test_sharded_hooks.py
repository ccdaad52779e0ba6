"""The gradient hooks and S3 over FSDP2 shards (2 CPU ranks, gloo) equal the same code over whole tensors: the
per-tensor norms and dot products are reduced across the shards by DTensor, unevenly split tensors included."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

SHAPES = {"wide": (6, 10), "odd": (5, 3), "one_row": (1, 7), "vector": (9,)}  # odd: uneven; one_row: rank 1 empty


class Params(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, shape in SHAPES.items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=gen)))


def set_grads(model, step: int, sharded: bool) -> None:
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(100 + step)
    for name, p in model.named_parameters():
        g = torch.randn(SHAPES[name], generator=gen) * step  # growing norms: the limiter acts
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if sharded else g


def worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from llmstable.optimizers import S3
    from llmstable.stabilizers import NormGrowthLimiter, OrthoGrad

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    worst = {}
    for name, make in (("orthograd", OrthoGrad), ("norm_growth_limiter", NormGrowthLimiter)):
        whole, sharded = Params(), fully_shard(Params(), mesh=mesh)
        h_whole, h_sharded = make(), make()
        worst[name] = 0.0
        for step in range(1, 5):
            set_grads(whole, step, False)
            set_grads(sharded, step, True)
            h_whole.on_gradients(whole)
            h_sharded.on_gradients(sharded)
            for p, q in zip(whole.parameters(), sharded.parameters()):
                rel = ((p.grad - q.grad.full_tensor()).abs().max() / p.grad.abs().max()).item()
                worst[name] = max(worst[name], rel)
    whole, sharded = Params(), fully_shard(Params(), mesh=mesh)
    o_whole, o_sharded = S3(whole.parameters(), lr=1e-2), S3(sharded.parameters(), lr=1e-2)
    for step in range(1, 5):
        set_grads(whole, step, False)
        set_grads(sharded, step, True)
        o_whole.step()
        o_sharded.step()
    worst["s3"] = max((p - q.full_tensor()).abs().max().item() for p, q in zip(whole.parameters(), sharded.parameters()))
    results[rank] = worst
    dist.destroy_process_group()


def test_hooks_and_s3_over_fsdp2_shards_equal_whole_tensors():
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(worker, args=(f"{tmp}/init", results), nprocs=2)
    for rank in (0, 1):
        assert results[rank]["orthograd"] < 1e-6 and results[rank]["norm_growth_limiter"] < 1e-6, results[rank]
        assert results[rank]["s3"] == 0.0  # elementwise: the shards are the whole computation
