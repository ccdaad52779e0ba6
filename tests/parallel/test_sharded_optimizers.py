"""SPAM and Stable-SPAM over FSDP2 shards equal the same optimizers over whole tensors: the per-tensor statistics
of Stable-SPAM (max |g|, ||g||) are all-reduced over the shards, and a rank with no rows of a small tensor
takes part with an empty shard."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

SHAPES = {"wide": (6, 10), "odd": (5, 3), "one_row": (1, 7), "vector": (9,)}  # one_row: rank 1 holds nothing


class Params(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, shape in SHAPES.items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=gen)))


def gradients(step: int) -> dict[str, torch.Tensor]:
    """The same gradients on every rank, with a spike at step 3 so that AdaClip has entries to clip."""
    gen = torch.Generator().manual_seed(100 + step)
    out = {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
    if step == 3:
        out["wide"][0, 0] = 50.0
    return out


def make_optimizer(name: str, params):
    from llmstable.optimizers import SPAM, StableSPAM

    if name == "stable_spam":
        return StableSPAM(params, lr=1e-2, weight_decay=0.1, total_T=10, update_proj_gap=4)
    return SPAM(params, lr=1e-2, weight_decay=0.1, warmup_steps=2, DeltaT=4, grad_accu_steps=1, threshold=2)


def shard_like(p, g: torch.Tensor) -> torch.Tensor:
    """g as a DTensor sharded like FSDP2's parameter p: this rank's torch.chunk of dim 0, made locally (no
    scatter: every rank holds the whole g already)."""
    from torch.distributed.tensor import DTensor

    chunks = torch.chunk(g, p.device_mesh.size(), dim=0)
    rank = p.device_mesh.get_local_rank()
    local = chunks[rank] if rank < len(chunks) else g.new_empty((0, *g.shape[1:]))
    return DTensor.from_local(local.clone(), p.device_mesh, p.placements, run_check=False, shape=g.shape,
                              stride=g.stride())


def run_steps(model, optimizer, steps: int = 6) -> None:
    from torch.distributed.tensor import DTensor

    for step in range(1, steps + 1):
        for name, p in model.named_parameters():
            g = gradients(step)[name]
            p.grad = shard_like(p, g) if isinstance(p, DTensor) else g
        optimizer.step()


def _rank(rank: int, init_file: str, name: str, out_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = fully_shard(Params(), mesh=init_device_mesh("cpu", (2,)))
        optimizer = make_optimizer(name, model.parameters())
        run_steps(model, optimizer)
        weights = {n: p.full_tensor() for n, p in model.named_parameters()}
        stats = {n: optimizer.state[p]["norm_stats"].clone() for n, p in model.named_parameters()
                 if "norm_stats" in optimizer.state[p]}
        metrics = optimizer.metrics()  # sums the clipped counts over the ranks (a collective)
        if rank == 0:
            torch.save({"weights": weights, "stats": stats, "metrics": metrics}, out_file)
        dist.barrier()  # (destroying the group while the other rank still works can abort it)
    finally:
        dist.destroy_process_group()
    # This bare harness aborted at interpreter teardown in about 1 run in 15 ("terminate called without an active
    # exception", after the results were written and the group destroyed); full training runs through the same
    # optimizer did not (0 in 20). Leave without the teardown: the result is already on disk.
    os._exit(0)


@pytest.mark.parametrize("name", ["stable_spam", "spam"])
def test_sharded_statistics_and_updates_equal_the_unsharded_ones(tmp_path, name):
    model = Params()
    optimizer = make_optimizer(name, model.parameters())
    run_steps(model, optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(tmp_path / "sharded.pt")
        mp.start_processes(_rank, args=(os.path.join(tmp, "store"), name, out), nprocs=2, start_method="spawn")
    sharded = torch.load(out, weights_only=False)
    for n, p in model.named_parameters():
        torch.testing.assert_close(sharded["weights"][n], p.detach(), rtol=1e-6, atol=1e-7)
        if name == "stable_spam":  # mu (EMA of max |g|), and the two moments of ||g||
            torch.testing.assert_close(sharded["stats"][n], optimizer.state[p]["norm_stats"], rtol=1e-6, atol=0)
    assert sharded["metrics"] == optimizer.metrics()
    assert sharded["metrics"][f"stab/{name}/clipped"] > 0
