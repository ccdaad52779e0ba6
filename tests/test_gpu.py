"""GPU-only checks, opt-in: `make test-gpu` (pytest -m gpu). Skipped where CUDA is absent."""

import pytest
import torch

from llmstable.optimizers import SPAM, StableSPAM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("make", [
    lambda ps, c: SPAM(ps, lr=1e-2, weight_decay=0.1, warmup_steps=5, threshold=50, DeltaT=20, grad_accu_steps=3,
                       compiled=c),
    lambda ps, c: StableSPAM(ps, lr=1e-2, weight_decay=0.1, total_T=60, update_proj_gap=20, compiled=c),
], ids=["spam", "stable_spam"])
def test_compiled_update_on_cuda_matches_eager(make):
    torch.manual_seed(0)
    shapes = [(256, 128), (128,), (64, 64)]
    init = [torch.randn(s, device="cuda") * 0.1 for s in shapes]
    runs = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(params, compiled)
        gen = torch.Generator(device="cuda").manual_seed(1)
        for t in range(60):
            for p in params:
                g = torch.randn(p.shape, device="cuda", generator=gen) * 0.01
                if t % 17 == 0:
                    g[0] *= 1000
                p.grad = g
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_tiny_run_trains_on_cuda_in_bf16(tiny_config, tmp_path):
    from llmstable.trainer import train

    summary = train(tiny_config("train.device=cuda", "train.max_steps=30", "optimizer=stable_spam",
                                "stabilizer=[zloss,qk_norm]", run_dir=tmp_path / "run"))
    assert summary["final_val_loss"] < 6.0


@pytest.mark.parametrize("engine", [["distributed=fsdp2", "distributed.param_dtype=bf16"],
                                    ["distributed=deepspeed", "distributed.zero_stage=2", "train.precision=bf16"]],
                         ids=["fsdp2-bf16", "zero2-bf16"])
def test_a_world_of_one_on_cuda_trains_with_nccl_in_bf16(tiny_config, tmp_path, engine):
    """ddp/fsdp2/deepspeed without a launcher: a world of one over NCCL."""
    from llmstable.trainer import train

    summary = train(tiny_config("train.device=cuda", "train.max_steps=30", *engine, run_dir=tmp_path / "run"))
    assert summary["final_val_loss"] < 6.5 and summary["world_size"] == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_gpus_over_nccl_follow_one_gpu(tmp_path, engine):
    from llmstable.metrics import read_jsonl
    from tests.conftest import TINY
    from tests.parallel.launch import run_ranks

    common = [*TINY, "train.device=cuda", "train.precision=fp32", "train.max_steps=20"]
    run_ranks(1, common, tmp_path / "one")
    run_ranks(2, [*common, f"distributed={engine}"], tmp_path / "two")
    loss = {n: [r["train/loss"] for r in read_jsonl(tmp_path / n / "metrics.jsonl") if "train/loss" in r]
            for n in ("one", "two")}
    assert loss["two"] == pytest.approx(loss["one"], rel=1e-4)
