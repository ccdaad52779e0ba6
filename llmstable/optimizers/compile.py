"""torch.compile for per-tensor optimizer updates."""

from __future__ import annotations

import functools

import torch


@functools.cache
def compile_per_shape(fn):
    """Compile `fn` with static shapes: one graph per distinct tensor size (a LLaMA has about five).

    Static, because inductor's CPU code for reductions over a dynamic length (max |g|, ||g||) measured 6x slower
    than for a static one on the llama_60m shapes. Cached: every optimizer shares one compiled function per `fn`. Dynamo's per-function recompile limit (8 by default) would send
    the sixth size and later back to eager, so it is raised here for the process."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn, dynamic=False)


class _Kernel:
    """`fn` compiled once per call signature (tensor shapes, strides, dtypes and devices; every other argument by
    value), straight through inductor: the function is traced to an FX graph (`make_fx`) and handed to
    `torch._inductor.compile`, which also keeps its in-place writes to the inputs. Calling the result skips
    Dynamo's frame evaluation and guards, which cost about 50 us a call on CPU against about 15 us here: it
    matters for an optimizer that runs a few small kernels per parameter tensor. The caller guarantees what
    Dynamo would have checked: same signature, same code."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict[tuple, object] = {}
        functools.update_wrapper(self, fn)

    @staticmethod
    def _key(args) -> tuple:
        return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else
                     ("const", a) for a in args)

    def __call__(self, *args):
        key = self._key(args)
        kernel = self.compiled.get(key)
        if kernel is None:
            kernel = self.compiled[key] = self._compile(args)
        return kernel(*[a for a in args if isinstance(a, torch.Tensor)])

    def _compile(self, args):
        from torch._inductor import compile as inductor_compile
        from torch.fx.experimental.proxy_tensor import make_fx

        slots = [isinstance(a, torch.Tensor) for a in args]
        shape = {}  # what fn returns: None, one tensor, or a tuple of them

        def tensors_only(*tensors):
            it = iter(tensors)
            out = self.fn(*[next(it) if is_tensor else a for a, is_tensor in zip(args, slots)])
            shape["kind"] = "none" if out is None else "tuple" if isinstance(out, (tuple, list)) else "one"
            return () if out is None else tuple(out) if shape["kind"] == "tuple" else (out,)

        examples = [a.clone() for a in args if isinstance(a, torch.Tensor)]  # traced on copies: no input is changed
        compiled = inductor_compile(make_fx(tensors_only)(*examples), examples)
        kind = shape["kind"]

        def run(*tensors):
            out = compiled(*tensors)
            return None if kind == "none" else out[0] if kind == "one" else tuple(out)
        return run


@functools.cache
def compile_kernel(fn):
    """`fn` as a `_Kernel`: compiled per signature through inductor without Dynamo's per-call overhead."""
    return _Kernel(fn)
