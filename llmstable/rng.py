"""Every random number generator a run draws from, in one place: seeding them, and their state (which checkpoints
save and restore, so a resumed run draws the same numbers)."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
