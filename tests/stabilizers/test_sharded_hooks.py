"""The gradient and update hooks and S3 over FSDP2 shards (2 CPU ranks, gloo) equal the same code over whole tensors:
the per-tensor norms and dot products are reduced across the shards by DTensor, unevenly split tensors included.
QK-clip measured on each rank's half of a batch rescales like one process that saw all of it. The per-block norms of
spike localisation take one all-reduce for every block together. Under DDP the early warning's curvature predictor
gives every rank the curvature of the whole batch, and leaves DDP's gradients as they would be without it."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

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
    from llmstable.stabilizers import NormGrowthLimiter, OrthoGrad, UpdateClip

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
    # Update clipping: the same updates applied to whole tensors and to shards, clipped alike.
    whole, sharded = Params(), fully_shard(Params(), mesh=mesh)
    c_whole, c_sharded = UpdateClip(k=1.5, window=3, min_history=1), UpdateClip(k=1.5, window=3, min_history=1)
    for step in range(1, 7):
        set_grads(whole, step, False)
        set_grads(sharded, step, True)
        for model, hook in ((whole, c_whole), (sharded, c_sharded)):
            hook.before_update(model)
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(1e-2 * p.grad * (10 if step == 5 else 1))  # a spike at step 5
            hook.on_update(model)
    worst["update_clip"] = max((p - q.full_tensor()).abs().max().item()
                               for p, q in zip(whole.parameters(), sharded.parameters()))
    worst["update_clip_clipped"] = c_sharded.metrics()["stab/update_clip/clipped"]
    worst["qk_clip"] = qk_clip_over_ranks(rank, mesh)
    worst["block_norms"], worst["block_norm_collectives"] = block_norms_over_shards(mesh)
    worst["curvature"], worst["ddp_grads"] = curvature_over_ddp(rank)
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


def qk_clip_over_ranks(rank: int, mesh) -> float:
    """Each rank measures its own half of the batch; after the all-reduce in on_gradients both rescale like one
    process that saw the whole batch, whole weights (DDP's case) and FSDP2 shards alike. Returns the largest
    difference of the rescaled W_q, W_k against the one-process result."""
    from torch.distributed.fsdp import fully_shard

    from llmstable.model import Llama, LlamaConfig
    from llmstable.stabilizers import QKClip

    def build():
        torch.manual_seed(0)
        return Llama(LlamaConfig(vocab_size=50, dim=32, intermediate_size=48, n_layers=2, n_heads=4, n_kv_heads=2,
                                 max_seq_len=8, init_std=0.3))

    idx = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(5))
    results = {}
    for kind in ("one_process", "replicated", "sharded"):
        hook = QKClip(tau=0.5)
        model = hook.transform_model(build())
        if kind == "sharded":
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        batch = idx if kind == "one_process" else idx[2 * rank: 2 * rank + 2]
        with torch.no_grad():
            model(batch)
        if kind == "one_process":  # no collective: every rank computes the whole batch alone
            hook._step_max = hook.probe.close(hook.reader)
        else:
            hook.on_gradients(model)
        hook.on_update(model)
        results[kind] = [w.full_tensor() if hasattr(w, "full_tensor") else w.detach().clone()
                         for layer in model.layers for w in (layer.attention.wq.weight, layer.attention.wk.weight)]
        assert hook.metrics()["stab/qk_clip/clipped_heads"] > 0
    return max((a - b).abs().max().item() for kind in ("replicated", "sharded")
               for a, b in zip(results["one_process"], results[kind]))


def block_norms_over_shards(mesh) -> tuple[float, list[int]]:
    """Per-block gradient norms, per-block update norms and the whole update's norm of a model sharded per block
    (its odd shapes split unevenly) against the same model whole; and the all-reduces each of the three took on the
    shards (DTensor's per-tensor `full_tensor` is made to fail)."""
    from unittest import mock

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    from llmstable.indicators import UpdateNorm, layer_grad_norms
    from llmstable.model import Llama, LlamaConfig
    from llmstable.stabilizers.localize import block_update_norms

    def build():
        torch.manual_seed(0)
        return Llama(LlamaConfig(vocab_size=37, dim=12, intermediate_size=20, n_layers=3, n_heads=3, n_kv_heads=1,
                                 max_seq_len=8))

    def measure(model) -> list[torch.Tensor]:
        grads = layer_grad_norms(model)
        update = UpdateNorm.__new__(UpdateNorm)  # (its constructor's host syncs are not under test)
        update.model, update.values = model, {}
        update.before = [p.detach().clone() for p in model.parameters()]
        before = [[p.detach().clone() for p in layer.parameters()] for layer in model.layers]
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.01 * p.grad)
        blocks = block_update_norms(model, before)
        return [grads, blocks, torch.tensor([update.after_step()["optim/update_norm"]])]

    whole, sharded = build(), build()
    for layer in sharded.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    gen = torch.Generator().manual_seed(3)
    for p, q in zip(whole.parameters(), sharded.parameters()):
        p.grad = torch.randn(p.shape, generator=gen) * (1 + p.numel() % 7)
        q.grad = distribute_tensor(p.grad, mesh, q.placements)
    calls = []
    real = dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with mock.patch.object(dist, "all_reduce", counted), \
            mock.patch.object(DTensor, "full_tensor", side_effect=AssertionError("a per-tensor collective")):
        got = measure(sharded)
    hybrid = build()  # HSDP: replicated over the mesh's first dimension (2 ranks), sharded over its second (1)
    hsdp_mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    for layer in hybrid.layers:
        fully_shard(layer, mesh=hsdp_mesh)
    fully_shard(hybrid, mesh=hsdp_mesh)
    for p, q in zip(whole.parameters(), hybrid.parameters()):
        q.grad = distribute_tensor(p.grad, hsdp_mesh, q.placements)
    got_hybrid = measure(hybrid)
    want = measure(whole)
    return max(((g - w).abs() / w).max().item() for run in (got, got_hybrid) for g, w in zip(run, want)), [len(calls)]


def curvature_over_ddp(rank: int) -> tuple[float, float]:
    """The predictor under DDP, each rank on its half of the batch, against one process on the whole batch (whose
    loss is the mean of the halves' losses, so its gradient and Hessian are the halves' means); and DDP's averaged
    gradients after the product against the whole batch's gradient. Returns the two relative differences."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.parallel import DistributedDataParallel

    from llmstable.config.stabilizer import SpikeGuardConfig
    from llmstable.model import Llama, LlamaConfig
    from llmstable.stabilizers.warning import PrecondWarning, adam_preconditioner, directional_curvature

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=40, dim=16, intermediate_size=24, n_layers=2, n_heads=2, max_seq_len=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(7))

    def loss_of(module, rows):
        logits = module(rows[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())

    for _ in range(2):  # Adam state, the same on both ranks
        opt.zero_grad()
        loss_of(model, idx).backward()
        opt.step()
    opt.zero_grad()
    with sdpa_kernel([SDPBackend.MATH]):
        loss = loss_of(model, idx)
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()  # P is the one this step's update applies: v_hat with the whole batch's gradient
        want = directional_curvature(loss, *adam_preconditioner(opt, current=True)).item()
    opt.zero_grad()
    ddp = DistributedDataParallel(model)
    warning = PrecondWarning(SpikeGuardConfig(watch=["loss", "precond_curvature"], curvature_interval=1),
                             proxy=False, curvature=True)
    warning.optimizer = opt
    warning.begin_step(2, logged=True)
    loss = loss_of(ddp, idx[2 * rank: 2 * rank + 2])
    warning.on_loss(loss)
    loss.backward()  # DDP's all-reduce of the gradients, after the Hessian-vector product
    warning.check(2)  # P from the averaged gradients, and the ranks' mean of g^T P H g
    got = warning.metrics()["stab/precond/curvature"]
    grad_diff = max(((p.grad - g).abs().max() / g.abs().max()).item() for p, g in zip(model.parameters(), grads))
    return abs(got - want) / abs(want), grad_diff


def test_hooks_and_s3_over_fsdp2_shards_equal_whole_tensors():
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(worker, args=(f"{tmp}/init", results), nprocs=2)
    for rank in (0, 1):
        assert results[rank]["orthograd"] < 1e-6 and results[rank]["norm_growth_limiter"] < 1e-6, results[rank]
        assert results[rank]["s3"] == 0.0  # elementwise: the shards are the whole computation
        assert results[rank]["update_clip"] < 1e-6 and results[rank]["update_clip_clipped"] > 0, results[rank]
        assert results[rank]["qk_clip"] < 1e-6, results[rank]
        assert results[rank]["curvature"] < 1e-5 and results[rank]["ddp_grads"] < 1e-5, results[rank]
        assert results[rank]["block_norms"] < 1e-6 and results[rank]["block_norm_collectives"] == [3], results[rank]
