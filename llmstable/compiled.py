"""torch.compile with an eager fallback: a compilation that fails (inductor, Triton, a missing C++ compiler, a torch
version whose private compile API changed) is one warning and an eager run, never a crash.

- `CompiledForward` wraps the model's forward (`train.compile`). A compile error raised by a forward call falls
  back to the eager module for that call and every later one; one raised by the first backward (AOT autograd
  compiles the backward lazily) is caught by the training step, which recomputes that step eagerly from the same
  data and RNG state (llmstable.step), so the run's numbers are those of an eager run.
- Optimizer kernels (llmstable.optimizers.compile) run each new call signature once on copies of their inputs
  before the real call: a failure there leaves the inputs untouched, and the kernel runs eagerly from then on.

The warning (a `CompileFallbackWarning`) names what failed, the error's first line and the key that turns the
compilation off, which also silences it.
"""

from __future__ import annotations

import warnings

import torch


class CompileFallbackWarning(RuntimeWarning):
    """A compilation failed; the eager code runs instead (same numbers, slower)."""


def is_compile_error(err: BaseException) -> bool:
    """Whether err (or an exception it was raised from) comes from torch's compiler stack (Dynamo, AOT autograd,
    inductor, Triton), rather than from the model's own code."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        module = type(err).__module__ or ""
        if module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "triton")):
            return True
        err = err.__cause__ or err.__context__
    return False


def first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def warn_fallback(what: str, err: BaseException, key: str) -> None:
    warnings.warn(f"{what} failed to compile and runs eagerly instead (same results, slower): {first_line(err)}. "
                  f"Set {key} to skip the compilation and this warning", CompileFallbackWarning, stacklevel=3)


class CompiledForward:
    """`module` through torch.compile, falling back to `module` itself on a compile error (see the module doc).
    `settled` turns true once a whole training step (forward and backward) has run; until then the training step
    keeps a replay point so that a failure in the first backward can be recomputed eagerly."""

    def __init__(self, module: torch.nn.Module):
        self.eager = module
        self.compiled = torch.compile(module)
        self.failed = False
        self.settled = False

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:
            if not is_compile_error(err):
                raise
            self.fall_back(err)
            return self.eager(*args, **kwargs)

    def fall_back(self, err: BaseException) -> None:
        self.failed = self.settled = True
        warn_fallback("the model (train.compile)", err, "train.compile=false")


def compiled_forward(module: torch.nn.Module, setting, device: torch.device, can_compile: bool):
    """The callable the loop runs the model with: `module` compiled or not, by `train.compile` (auto: compiled on
    CUDA, eager on the CPU, where compiling the small models measured slower end to end; see the README)."""
    use = setting is True or (setting == "auto" and device.type == "cuda")
    return CompiledForward(module) if use and can_compile else module
