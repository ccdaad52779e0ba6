"""Compilation with an eager fallback (llmstable.compiled, llmstable.optimizers.compile): a compile failure is one
warning and an eager run with the same numbers, never a crash."""

import json
import os
import subprocess
import sys

import pytest
import torch

from llmstable.compiled import CompileFallbackWarning, CompiledForward, is_compile_error
from llmstable.metrics import read_jsonl
from llmstable.optimizers.compile import Kernel, fallen_back


def scaled_add_(x, y, alpha):
    x.add_(y * alpha)
    return x.sum()


def failing_compiler(fn, args):
    """A compiled kernel that writes into its first input, then fails, as a kernel launched after its neighbour's
    successful one would: the trial on copies must keep the real inputs untouched."""
    from torch._inductor.exc import InductorError

    def run(*call_args):
        call_args[0].add_(1000.0)
        raise InductorError(RuntimeError("PassManager::run failed\nmore detail"), None)
    return run


def test_a_kernel_that_fails_to_compile_runs_eagerly_with_one_warning_and_changes_nothing_on_the_way():
    kernel = Kernel(scaled_add_, failing_compiler)
    x, y = torch.ones(4), torch.arange(4.0)
    with pytest.warns(CompileFallbackWarning) as caught:
        out = kernel(x, y, 2.0)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "scaled_add_" in message and "PassManager::run failed" in message and "more detail" not in message
    assert "optimizer.compiled=false" in message
    assert torch.equal(x, 1 + 2 * torch.arange(4.0)) and out.item() == 16.0  # the eager result, applied once
    with _no_warning():
        kernel(x, y, 1.0)  # later calls: eager, silently
    assert torch.equal(x, 1 + 3 * torch.arange(4.0))


def test_a_compile_error_at_the_first_real_call_falls_back_too_and_changes_nothing():
    """A compiler that compiles again at the real call (a guard the trial's copies did not match) and fails there."""
    from torch._inductor.exc import InductorError

    def fails_at_the_second_call(fn, args):
        calls = []

        def run(*call_args):
            calls.append(1)
            if len(calls) == 2:
                raise InductorError(RuntimeError("PassManager::run failed"), None)
            return fn(*call_args)
        return run

    kernel = Kernel(scaled_add_, fails_at_the_second_call)
    x, y = torch.ones(4), torch.arange(4.0)
    with pytest.warns(CompileFallbackWarning, match="scaled_add_"):
        kernel(x, y, 2.0)
    assert torch.equal(x, 1 + 2 * torch.arange(4.0)) and kernel.failed  # applied once, eagerly
    assert "scaled_add_" in fallen_back()


@pytest.mark.subprocess  # (inductor's C++ compiler)
def test_the_trial_on_a_parameter_under_no_grad_compiles_the_graph_the_real_call_uses():
    """Dynamo's guards check requires_grad and the Parameter type: the trial's copies keep them, or the real call
    compiles a second graph, outside the trial and its settings."""
    from torch._dynamo.utils import counters

    from llmstable.optimizers.compile import _dynamo

    def update_(p, g, lr):
        p.add_(g * lr)
        return g.abs().max()

    kernel = Kernel(update_, _dynamo)
    p = torch.nn.Parameter(torch.zeros(8))
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        kernel(p, torch.ones(8), 0.5)
        kernel(p, torch.ones(8), 0.5)
    assert counters["stats"]["unique_graphs"] - before == 1
    assert torch.equal(p.detach(), torch.full((8,), 1.0)) and p.requires_grad


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", CompileFallbackWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_a_working_kernel_compiles_once_per_signature_and_matches_eager():
    calls = []

    def counting_compiler(fn, args):
        calls.append(tuple(a.shape for a in args if isinstance(a, torch.Tensor)))
        return fn

    kernel = Kernel(scaled_add_, counting_compiler)
    for shape in ((3,), (3,), (5,)):
        x = torch.zeros(shape)
        kernel(x, torch.ones(shape), 0.5)
        assert torch.equal(x, torch.full(shape, 0.5))  # the trial ran on copies: applied once
    assert calls == [((3,), (3,)), ((5,), (5,))]


class _FailingBackward(torch.autograd.Function):
    """Identity forward; a backward that fails as a lazily compiled backward graph would."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        from torch._inductor.exc import InductorError

        raise InductorError(RuntimeError("PassManager::run failed"), None)


@pytest.mark.trains
def test_a_backward_that_fails_to_compile_is_recomputed_eagerly_with_the_same_losses(tiny_config, tmp_path):
    from llmstable.trainer import build_trainer

    eager = build_trainer(tiny_config("train.compile=false", run_dir=tmp_path / "eager"))
    eager.fit()
    eager.log.close()
    trainer = build_trainer(tiny_config("train.compile=true", run_dir=tmp_path / "fallback"))
    assert isinstance(trainer.forward, CompiledForward)
    module = trainer.forward.eager
    trainer.forward.compiled = lambda batch: _FailingBackward.apply(module(batch))  # forward runs, backward fails
    with pytest.warns(CompileFallbackWarning, match="train.compile=false"):
        trainer.fit()
    trainer.log.close()
    loss = {name: [r["train/loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train/loss" in r]
            for name in ("eager", "fallback")}
    assert len(loss["eager"]) == 6 and loss["fallback"] == loss["eager"]


def test_compile_errors_are_told_apart_from_the_models_own():
    from torch._inductor.exc import InductorError

    try:
        try:
            raise RuntimeError("PassManager::run failed")
        except RuntimeError as inner:
            raise ValueError("wrapped") from InductorError(inner, None)
    except ValueError as err:
        assert is_compile_error(err)
    assert not is_compile_error(RuntimeError("size mismatch"))


@pytest.mark.slow
@pytest.mark.trains
@pytest.mark.subprocess
def test_train_compile_with_no_working_compiler_warns_and_trains_like_eager(tiny_config, tmp_path):
    """A real compile failure: inductor's C++ compiler is /bin/false, for the model (train.compile=true) and for
    Stable-SPAM's kernels (optimizer.compiled=true). The run finishes, warns once per thing that failed, and its
    losses equal an eager run's."""
    from tests.conftest import TINY

    common = [*TINY, "optimizer=stable_spam", "train.max_steps=4"]
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache"),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "llmstable.cli", "train", *common, "train.compile=true",
                             "optimizer.compiled=true", f"run_dir={tmp_path}/compiled"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    warned = [line for line in result.stderr.splitlines() if "CompileFallbackWarning" in line]
    assert any("the model (train.compile)" in line and "train.compile=false" in line for line in warned), warned
    assert any("optimizer kernel" in line and "optimizer.compiled=false" in line for line in warned), warned
    assert all("C++ compiler" in line for line in warned)
    assert "Traceback" not in result.stderr
    from llmstable.trainer import train

    train(tiny_config("optimizer=stable_spam", "train.max_steps=4", "train.compile=false", "optimizer.compiled=false",
                      run_dir=tmp_path / "eager"))
    loss = {name: [r["train/loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train/loss" in r]
            for name in ("compiled", "eager")}
    assert len(loss["eager"]) == 4 and loss["compiled"] == pytest.approx(loss["eager"], rel=1e-6)
    assert json.loads((tmp_path / "compiled" / "summary.json").read_text())["steps"] == 4


def test_compile_is_auto_by_default_compiled_on_cuda_only(tiny_config):
    from llmstable.compiled import compiled_forward

    cfg = tiny_config()
    assert cfg.train.compile == "auto"
    module = torch.nn.Linear(2, 2)
    assert compiled_forward(module, "auto", torch.device("cpu"), True) is module
    assert isinstance(compiled_forward(module, "auto", torch.device("cuda"), True), CompiledForward)
    assert compiled_forward(module, "auto", torch.device("cuda"), False) is module  # the engine cannot compile
    assert isinstance(compiled_forward(module, True, torch.device("cpu"), True), CompiledForward)


def test_compiling_under_deepspeed_is_refused_with_the_reason(tiny_config):
    from llmstable.config import ConfigError

    with pytest.raises(ConfigError, match="train.compile=true cannot take effect under distributed=deepspeed"):
        tiny_config("distributed=deepspeed", "train.compile=true")
    tiny_config("distributed=deepspeed")  # auto: eager there, no error
