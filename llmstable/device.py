"""Where and how a run computes: the device, the precision (bf16 autocast), deterministic kernels, and the memory
it holds."""

from __future__ import annotations

import contextlib
import os

import torch

from llmstable.config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"train.device={name!r} but no CUDA device is available: use train.device=cpu or auto"])
    return torch.device(name)


def use_deterministic_algorithms(on: bool) -> None:
    """train.deterministic: torch's deterministic kernels (and cuBLAS's fixed workspace, which they need on CUDA;
    set before the first matmul unless the user set it), so that a resumed or replayed GPU step computes the same
    bits. Off: torch's defaults."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision auto or bf16); plain fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def memory_mb(device: torch.device) -> float:
    """CUDA: the peak of allocated tensor memory since the run started; CPU: the resident set now (the trainer
    keeps the largest value seen at logged steps, since a process-wide peak would carry over between the runs
    of an in-process sweep)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
