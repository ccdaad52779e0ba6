"""A checkpoint's content held in CPU memory: what the asynchronous writer writes to disk, and what the rollback ring
restores without reading the disk (llmstable.checkpointer).

A `Snapshot` is taken in one blocking pass at a step boundary: the engine's tensors copied to CPU memory (pinned
when they live on a GPU, so the copies run at full bus speed), every RNG state, the trainer's state as JSON text
and the config. Written out, it gives the same bytes as a synchronous save (`model.safetensors` with the same
shared-tensor handling as `safetensors.torch.save_model`, `optimizer.pt`, `rng.pt`, `state.json`, `config.yaml`).
Restored, it gives the same values as loading those files: every tensor is copied again, so the live model and
optimizer never share memory with the snapshot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Snapshot:
    step: int
    engine: dict  # the engine's tensors (Engine.snapshot), on CPU
    rng: dict  # llmstable.rng.rng_state() at the snapshot
    state_json: str  # the trainer's state_dict(), as state.json will hold it
    config_yaml: str
    nbytes: int = 0  # the tensors' size in memory

    def state(self) -> dict:
        """The trainer state as a load from state.json would give it (a fresh object each call)."""
        return json.loads(self.state_json)


def to_host(obj, pin: bool = False, memo: dict | None = None):
    """obj with every tensor copied to CPU memory (nested dicts, lists and tuples rebuilt; other values shared,
    being immutable here: numbers, strings, None). `pin`: page-locked memory for tensors that live on a GPU. An
    object reached twice is copied once (as pickle and deepcopy keep sharing), so the copy saves to the same bytes."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) and hasattr(obj, "__tensor_flatten__"):
            # A tensor subclass (torchao's 8-bit optimizer states): its inner tensors, copied, in a new instance.
            names, ctx = obj.__tensor_flatten__()
            inner = {name: to_host(getattr(obj, name), pin, memo) for name in names}
            out = type(obj).__tensor_unflatten__(inner, ctx, obj.shape, obj.stride())
        elif obj.device.type == "cpu":
            out = obj.detach().clone()
        else:
            out = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=pin)
            out.copy_(obj.detach(), non_blocking=pin)
    elif isinstance(obj, dict):
        out = {k: to_host(v, pin, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        out = [to_host(v, pin, memo) for v in obj]
    elif isinstance(obj, tuple):
        out = tuple(to_host(v, pin, memo) for v in obj)
    else:
        return obj
    memo[id(obj)] = out
    return out


def copied(obj):
    """A deep copy of a snapshot's tensors (what restoring hands to load_state_dict, which may keep them)."""
    return to_host(obj)


def nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor) and type(obj) not in (torch.Tensor, torch.nn.Parameter) and hasattr(
            obj, "__tensor_flatten__"):
        return sum(nbytes(getattr(obj, name)) for name in obj.__tensor_flatten__()[0])
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def safetensors_layout(state: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, str] | None]:
    """The names `safetensors.torch.save_model` writes and its metadata: of tensors that share one storage (tied
    embeddings), the alphabetically first name that covers the whole storage is kept and each dropped name maps to
    it in the metadata."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(name)
    kept, metadata = [], {}
    for names in groups.values():
        if len(names) == 1:
            kept.append(names[0])
            continue
        whole = [n for n in names if state[n].data_ptr() == state[n].untyped_storage().data_ptr()
                 and state[n].numel() * state[n].element_size() == state[n].untyped_storage().nbytes()]
        keep = sorted(whole or names)[0]
        kept.append(keep)
        metadata.update({n: keep for n in names if n != keep})
    order = {name: i for i, name in enumerate(state)}
    return sorted(kept, key=order.__getitem__), metadata or None


def model_snapshot(model: torch.nn.Module, pin: bool) -> dict:
    state = model.state_dict()
    names, metadata = safetensors_layout(state)
    return {"tensors": {n: to_host(state[n].contiguous(), pin) for n in names}, "metadata": metadata}


def write_model(directory: Path, snap: dict) -> None:
    from safetensors.torch import save_file

    save_file(snap["tensors"], str(directory / "model.safetensors"), metadata=snap["metadata"])


def restore_model(model: torch.nn.Module, snap: dict) -> None:
    """The snapshot's weights into model, as `safetensors.torch.load_model` would put them (tied names follow)."""
    with torch.no_grad():
        state = model.state_dict()
        for name, tensor in snap["tensors"].items():
            state[name].copy_(tensor)
        for dropped, kept in (snap["metadata"] or {}).items():
            if state[dropped].data_ptr() != state[kept].data_ptr():
                state[dropped].copy_(snap["tensors"][kept])
