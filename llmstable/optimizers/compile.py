"""Compiled per-tensor optimizer updates, with an eager fallback.

Two compilers, one wrapper (`Kernel`):
- `compile_per_shape(fn)`: torch.compile with static shapes (SPAM, S3, Fira);
- `compile_kernel(fn)`: straight through inductor (`make_fx` + `torch._inductor.compile`), without Dynamo's
  per-call frame evaluation and guards (Stable-SPAM's four small kernels per tensor).

Each new call signature (tensor shapes, strides, dtypes, devices; every other argument by value) is compiled and
first run on copies of its inputs. If that fails (Triton's `PassManager::run failed`, no C++ compiler, a torch whose
private compile API moved), the kernel warns once (llmstable.compiled.CompileFallbackWarning, naming the kernel, the
error's first line and `optimizer.compiled=false`) and runs its eager function from then on. The trial runs on
copies, so a failure changes no state: the numbers are the eager function's. The copies keep what Dynamo's guards
check (a Parameter stays a Parameter, requires_grad stays), so the real call reuses the trial's graph; it runs under
the same settings and, should a compiler still compile again there, a compile error there falls back the same way.

Inductor's mix-order reduction (fusing reductions over different axes of one tensor into one persistent kernel) is
off for these kernels: each reduces a whole tensor to scalars, so there is nothing for it to fuse, and it is the
first suspect of the Triton failure seen on an H200 with triton 3.6 (unverified here: no GPU; `make gpu-check`
probes it, see scripts/gpu_check.py).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from llmstable.compiled import is_compile_error, warn_fallback


class Kernel:
    """`fn` compiled per call signature by `compiler(fn, args) -> callable(*args)`, with the trial run and eager
    fallback described above. Calling it is calling `fn`."""

    def __init__(self, fn, compiler):
        self.fn, self.compiler = fn, compiler
        self.compiled: dict[tuple, object] = {}
        self.failed = False
        functools.update_wrapper(self, fn)
        _KERNELS.append(self)

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        key = _signature(args)
        kernel = self.compiled.get(key)
        if kernel is not None:
            return kernel(*args)
        try:
            with _kernel_config():  # (compilation happens here, in the compiler or at the trial's first call)
                kernel = self.compiler(self.fn, args)
                kernel(*[_copy(a) for a in args])  # the trial, on copies that Dynamo's guards cannot tell apart
        except Exception as err:  # noqa: BLE001  (compilers fail in many ways; the eager function is the reference)
            return self._fall_back(err, args)
        self.compiled[key] = kernel
        try:
            with _kernel_config():  # (a compiler that compiles again at the first real call: the same settings)
                return kernel(*args)
        except Exception as err:
            if not is_compile_error(err):
                raise
            return self._fall_back(err, args)  # (a compile error is raised before the kernel runs: nothing changed)

    def _fall_back(self, err: Exception, args):
        self.failed = True
        warn_fallback(f"the optimizer kernel {self.fn.__name__}", err, "optimizer.compiled=false")
        return self.fn(*args)


def _copy(a):
    """A copy of a call argument for the trial: a tensor's values, its type (a Parameter stays one) and its
    requires_grad, which Dynamo's guards check (a plain clone of a parameter under no_grad would make the real call
    compile a second graph, outside the trial)."""
    if not isinstance(a, torch.Tensor):
        return a
    copy = a.detach().clone()
    if isinstance(a, torch.nn.Parameter):
        return torch.nn.Parameter(copy, requires_grad=a.requires_grad)
    return copy.requires_grad_(a.requires_grad) if a.is_leaf else copy


_KERNELS: list[Kernel] = []  # every kernel of this process (one per function: every optimizer shares it)


def fallen_back() -> list[str]:
    """The kernels of this process that run eagerly after a failed compilation. A kernel is shared by every
    optimizer of the process, so a later optimizer's "compiled" step runs these eagerly too (and warns no more)."""
    return sorted({kernel.fn.__name__ for kernel in _KERNELS if kernel.failed})


def _signature(args) -> tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("const", a)
                 for a in args)


def _kernel_config():
    """Inductor settings for the optimizer kernels (mix-order reduction off where this torch has it)."""
    from torch._inductor import config

    if hasattr(config, "triton") and hasattr(config.triton, "mix_order_reduction"):
        return config.patch({"triton.mix_order_reduction": False})
    return contextlib.nullcontext()


def _dynamo(fn, args):
    """torch.compile with static shapes: one graph per distinct tensor size (a LLaMA has about five). Static,
    because inductor's CPU code for reductions over a dynamic length (max |g|, ||g||) measured 6x slower than for a
    static one on the llama_60m shapes. Dynamo's per-function recompile limit (8 by default) would send the sixth
    size and later back to eager, so it is raised here for the process."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return _dynamo_compiled(fn)


@functools.cache
def _dynamo_compiled(fn):
    return torch.compile(fn, dynamic=False)


def _inductor(fn, args):
    """fn traced to an FX graph (`make_fx`) and handed to `torch._inductor.compile`, which keeps its in-place writes
    to the inputs. Calling the result skips Dynamo's frame evaluation and guards, which cost about 50 us a call on
    CPU against about 15 us here: it matters for an optimizer that runs a few small kernels per parameter tensor.
    `Kernel` guarantees what Dynamo would have checked: the same signature, the same code."""
    from torch._inductor import compile as inductor_compile
    from torch.fx.experimental.proxy_tensor import make_fx

    slots = [isinstance(a, torch.Tensor) for a in args]
    shape = {}  # what fn returns: None, one tensor, or a tuple of them

    def tensors_only(*tensors):
        it = iter(tensors)
        out = fn(*[next(it) if is_tensor else a for a, is_tensor in zip(args, slots)])
        shape["kind"] = "none" if out is None else "tuple" if isinstance(out, (tuple, list)) else "one"
        return () if out is None else tuple(out) if shape["kind"] == "tuple" else (out,)

    examples = [a.clone() for a in args if isinstance(a, torch.Tensor)]  # traced on copies: no input is changed
    compiled = inductor_compile(make_fx(tensors_only)(*examples), examples)
    kind = shape["kind"]

    def run(*call_args):
        out = compiled(*[a for a in call_args if isinstance(a, torch.Tensor)])
        return None if kind == "none" else out[0] if kind == "one" else tuple(out)
    return run


@functools.cache
def compile_per_shape(fn) -> Kernel:
    """`fn` through torch.compile, per static shape, with the eager fallback. Cached: every optimizer shares one."""
    return Kernel(fn, _dynamo)


@functools.cache
def compile_kernel(fn) -> Kernel:
    """`fn` compiled per signature through inductor without Dynamo's per-call overhead, with the eager fallback."""
    return Kernel(fn, _inductor)
