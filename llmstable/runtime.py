"""The process around a run: device, precision, seeding, memory, and every RNG state in one place."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from llmstable.config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"train.device={name!r} but no CUDA device is available: use train.device=cpu or auto"])
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def rng_state() -> dict:
    """Every RNG the run draws from: torch (CPU and CUDA), python and numpy. Tensors and plain lists only, so the
    checkpoint's rng.pt loads with torch.load(weights_only=True)."""
    torch_state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        torch_state["cuda"] = torch.cuda.get_rng_state_all()
    return {"torch": torch_state, "python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())}


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned (a part of it: each key is optional)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"]["cpu"])
        if "cuda" in state["torch"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["torch"]["cuda"])
    if state.get("python") is not None:
        random.setstate(_python_rng(state["python"]))
    if state.get("numpy") is not None:
        np.random.set_state(_numpy_rng(state["numpy"]))


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _python_rng(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _numpy_rng(state: list) -> tuple:
    kind, keys, pos, has_gauss, cached = state
    return kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached
