"""Checkpoints: written atomically, verified by a manifest of checksums, loaded without unpickling objects.

Layout of `RUN_DIR/checkpoints/step_00000100/`:
- `model.safetensors`: the model weights;
- `optimizer.pt`: the optimizer state dict (tensors and numbers only; loaded with `weights_only=True`);
- `rng.pt`: the torch CPU and CUDA generator states (loaded with `weights_only=True`);
- `state.json`: step and token counters, the data loader's position, the python and numpy RNG states, and
  whatever else the trainer needs to continue;
- `config.yaml`: the resolved config of the run that wrote it;
- `manifest.json`, written last: the size and SHA-256 of every other file.

A checkpoint is written into a hidden temporary directory, every file is fsync'd, and the directory is renamed
into place; a crash at any point leaves either the whole checkpoint or none. On load, a checkpoint whose files
do not match its manifest is skipped with a warning that names the file, and the one before it is used.

A checkpoint becomes *good* (a `GOOD` marker file, written atomically) once enough clean steps have followed it;
the spike guard rolls back to the newest good one, and pruning never deletes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

MANIFEST = "manifest.json"
GOOD = "GOOD"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory or file."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
    config_yaml: str, keep: int, before_commit=None, good: bool = False,
) -> Path:
    """Write checkpoint `step` under root atomically, then delete all but the newest `keep` (and the newest good
    one). `before_commit`, if given, is called with every file but the manifest written (fault injection)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(_torch_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        _fsync(tmp / name)
    if before_commit is not None:
        before_commit()
    manifest = {"step": step, "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    if good:
        (tmp / GOOD).write_text(str(step))
        _fsync(tmp / GOOD)
    _fsync(tmp)
    if final.exists():  # the same step written again (e.g. after a resume): swap, never leave a gap
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(root)
    _prune(root, keep)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories, newest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def verify(path: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong, naming the file."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return f"{manifest_file} is missing (the write was interrupted)"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"{manifest_file} is unreadable: {err}"
    for name, meta in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
            return f"{file} does not match its checksum in {MANIFEST}"
    return None


def mark_good(path: Path) -> None:
    tmp = path / f".{GOOD}.tmp"
    tmp.write_text(path.name)
    _fsync(tmp)
    os.replace(tmp, path / GOOD)
    _fsync(path)


def is_good(path: Path) -> bool:
    return (path / GOOD).is_file()


def latest_good(root: Path, check_files: bool = True) -> Path | None:
    """The newest checkpoint that is marked good (and, with check_files, passes verification)."""
    for path in list_checkpoints(root):
        if is_good(path) and (not check_files or verify(path) is None):
            return path
    return None


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint that passes verification; broken ones are skipped with a warning."""
    for path in list_checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path
        warnings.warn(f"skipping corrupt checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model, optimizer and torch RNGs from `path`; returns state.json's content."""
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"cannot load checkpoint {path}: {problem}")
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path / 'model.safetensors'} does not fit the model: missing {sorted(missing)}, unexpected "
            f"{sorted(unexpected)}. Was it written with another model config?"
        )
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    _set_torch_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def load_initial_weights(model: torch.nn.Module, path: Path) -> None:
    """Weights from a safetensors file; parameters the file lacks (an arm's QK-norm weights) keep their init."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"train.init_from={str(path)!r} does not exist: point it at a .safetensors file")
    weights = load_file(str(path))
    own = model.state_dict()
    wrong = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"train.init_from={str(path)!r} does not fit this model: {wrong[:5]} are missing "
                              "from the model or have another shape")
    model.load_state_dict(weights, strict=False)


def fingerprint(tensors) -> str:
    """A short hash of tensors' bytes: to check that arms really start alike."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _torch_rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_torch_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep`, never the newest good one."""
    good = latest_good(root, check_files=False)
    for path in list_checkpoints(root)[keep:]:
        if path != good:
            shutil.rmtree(path, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
