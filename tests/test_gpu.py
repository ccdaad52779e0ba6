"""GPU checks, opt-in: `make test-gpu` (pytest -m gpu), and the first part of `make gpu-check`. Skipped where CUDA is
absent. A few steps each, on tiny_1m in bf16: every optimizer compiled and eager, every stabilizer together and
each loss, FSDP2 and DeepSpeed ZeRO 1-3 as a world of one, a spike rollback, a bit-identical kill and resume with
deterministic algorithms, and an export that transformers reloads. A compile fallback counts as a failure here
(warnings are errors): on a GPU the compiled path itself must work."""

import json
import os
import subprocess
import sys

import pytest
import torch

from llmstable.compiled import CompileFallbackWarning
from llmstable.metrics import read_jsonl
from llmstable.optimizers import SPAM, StableSPAM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("error::llmstable.compiled.CompileFallbackWarning")]

CUDA = ["train.device=cuda", "train.precision=bf16", "train.max_steps=4", "train.eval_interval=4",
        "train.checkpoint_interval=0"]
OPTIMIZERS = ["adamw", "adamw8bit", "spam", "stable_spam", "fira", "s3", "muon", "lion", "soap", "adam_mini"]


def losses(run_dir):
    return [r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


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


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_in_bf16_compiled_like_eager(tiny_config, tmp_path, optimizer):
    """The model compiled (train.compile=true) and the optimizer's kernels compiled where it has any, against the
    same run eager: both finish, and the compiled losses follow the eager ones to bf16 accuracy."""
    from llmstable.trainer import train
    from tests.stabilizers.test_conformance import TINY_SETTINGS

    settings = [*TINY_SETTINGS[f"optimizer/{optimizer}"], *CUDA]
    has_kernels = hasattr(tiny_config(*settings).optimizer, "compiled")
    runs = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        flags = [f"train.compile={flag}", *([f"optimizer.compiled={flag}"] if has_kernels else [])]
        summary = train(tiny_config(*settings, *flags, run_dir=tmp_path / name))
        assert summary["steps"] == 4 and summary["engine"] == "single"
        runs[name] = losses(tmp_path / name)
    assert all(torch.isfinite(torch.tensor(runs["compiled"])))
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=2e-2)


def test_every_stabilizer_together_trains_on_cuda(tiny_config, tmp_path):
    from llmstable.trainer import train
    from tests.stabilizers.test_conformance import COMBINED, COMBINED_QK_CLIP, TINY_SETTINGS

    for i, combo in enumerate((COMBINED, COMBINED_QK_CLIP, TINY_SETTINGS["stabilizer/spike_guard"])):
        summary = train(tiny_config(*combo, *CUDA, run_dir=tmp_path / f"combo{i}"))
        assert summary["steps"] == 4 and summary["final_val_loss"] is not None


@pytest.mark.parametrize("loss", ["cross_entropy", "stablemax", "spherical_z"])
def test_each_loss_trains_on_cuda(tiny_config, tmp_path, loss):
    from llmstable.trainer import train

    summary = train(tiny_config(f"loss={loss}", "stabilizer=[softmax_collapse]", *CUDA, "train.max_steps=8",
                                run_dir=tmp_path / "run"))
    curve = losses(tmp_path / "run")
    assert summary["steps"] == 8 and curve[-1] < curve[0]


@pytest.mark.parametrize("engine", [["distributed=fsdp2", "distributed.param_dtype=bf16"],
                                    ["distributed=deepspeed", "distributed.zero_stage=1"],
                                    ["distributed=deepspeed", "distributed.zero_stage=2"],
                                    ["distributed=deepspeed", "distributed.zero_stage=3"]],
                         ids=["fsdp2-bf16", "zero1", "zero2", "zero3"])
def test_a_world_of_one_on_cuda_trains_with_nccl_in_bf16(tiny_config, tmp_path, engine):
    """ddp/fsdp2/deepspeed without a launcher: a world of one over NCCL (llmstable sets what DeepSpeed asserts on)."""
    from llmstable.trainer import train

    summary = train(tiny_config(*CUDA, "train.max_steps=8", *engine, run_dir=tmp_path / "run"))
    assert summary["final_val_loss"] < 6.5 and summary["world_size"] == 1
    assert "LOCAL_RANK" not in os.environ or os.environ.get("LOCAL_RANK") == "0"


def test_a_loss_spike_on_cuda_is_rolled_back(tiny_config, tmp_path):
    from llmstable.trainer import train

    summary = train(tiny_config(*CUDA, "train.max_steps=12", "train.checkpoint_interval=2",
                                "train.keep_checkpoints=4", "stabilizer=[spike_guard]",
                                "stabilizer.spike_guard.min_history=3", "stabilizer.spike_guard.good_after_steps=2",
                                "stabilizer.spike_guard.skip_steps=0", "fault.loss_scale_steps=[9]",
                                run_dir=tmp_path / "run"))
    events = [e["event"] for e in read_jsonl(tmp_path / "run" / "events.jsonl")]
    assert summary["rollbacks"] == 1 and "rollback" in events and summary["steps"] == 12


def test_kill_and_resume_on_cuda_is_bit_identical_with_deterministic_algorithms(tiny_config, tmp_path):
    from tests.conftest import TINY

    common = [*TINY, *CUDA, "train.max_steps=8", "train.checkpoint_interval=3", "train.deterministic=true"]
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

    def cli(*overrides):
        return subprocess.run([sys.executable, "-m", "llmstable.cli", "train", *common, *overrides], env=env,
                              capture_output=True, text=True, timeout=600)

    assert cli(f"run_dir={tmp_path}/whole").returncode == 0
    killed = cli(f"run_dir={tmp_path}/killed", "fault.kill_at_step=5")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = cli(f"run_dir={tmp_path}/killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = {r["step"]: r["train/loss"] for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if "train/loss" in r}
    again = {r["step"]: r["train/loss"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "train/loss" in r}
    assert again == whole and len(whole) == 8


def test_an_export_of_a_cuda_run_reloads_in_transformers_with_the_same_logits(tiny_config, tmp_path):
    from transformers import LlamaForCausalLM

    from llmstable.export import export_hf, load_trained
    from llmstable.trainer import train

    train(tiny_config(*CUDA, run_dir=tmp_path / "run"))
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).cuda().eval()
    model, _, _ = load_trained(tmp_path / "run")
    model = model.cuda().eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_gpus_over_nccl_follow_one_gpu(tmp_path, engine):
    from tests.conftest import TINY
    from tests.parallel.launch import run_ranks

    common = [*TINY, "train.device=cuda", "train.precision=fp32", "train.max_steps=20"]
    run_ranks(1, common, tmp_path / "one")
    run_ranks(2, [*common, f"distributed={engine}"], tmp_path / "two")
    loss = {n: losses(tmp_path / n) for n in ("one", "two")}
    assert loss["two"] == pytest.approx(loss["one"], rel=1e-4)


def test_the_fallback_warning_class_is_importable_for_the_filter():
    assert issubclass(CompileFallbackWarning, Warning)
