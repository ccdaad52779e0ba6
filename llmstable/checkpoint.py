"""Checkpoints: written atomically, verified by a manifest of checksums, loaded without unpickling objects.

Layout of `RUN_DIR/checkpoints/step_00000100/`:
- the model and optimizer, in the engine's format (llmstable.parallel.engines): `model.safetensors` and
  `optimizer.pt` (one process, DDP; loaded with `weights_only=True`), `dcp/` (FSDP2: sharded by
  torch.distributed.checkpoint) or `deepspeed/` (DeepSpeed ZeRO);
- `rng.pt`: the torch CPU and CUDA generator states (loaded with `weights_only=True`);
- `state.json`: step and token counters, the data loader's position, the python and numpy RNG states, and
  whatever else the trainer needs to continue;
- `config.yaml`: the resolved config of the run that wrote it;
- `manifest.json`, written last by rank 0 once every rank has written its shards: the size and SHA-256 of every
  other file, shards included.

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

MANIFEST = "manifest.json"
GOOD = "GOOD"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory or file."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_checkpoint(
    root: Path, step: int, engine, state: dict, config_yaml: str, keep: int, before_commit=None,
    good: bool = False,
) -> Path:
    """Write checkpoint `step` under root atomically, then delete all but the newest `keep` (and the newest good
    one). Every rank calls it: each writes its part of the weights and optimizer (`engine.save`), then rank 0
    writes the rest, the manifest over every file (shards included), and renames the directory into place.
    `before_commit`, if given, is called on every rank once all weights are written (fault injection)."""
    world = engine.world
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"  # the same name on every rank; a leftover of a killed write is replaced
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    world.barrier()
    engine.save(tmp)
    world.barrier()
    if before_commit is not None:
        before_commit()
    if world.is_main:
        torch.save(_torch_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        files = _files(tmp)
        for name in files:
            _fsync(tmp / name)
        manifest = {"step": step, "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
                                            for n in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        if good:
            (tmp / GOOD).write_text(str(step))
            _fsync(tmp / GOOD)
        for sub in sorted({(tmp / n).parent for n in files}, reverse=True):
            _fsync(sub)
        if final.exists():  # the same step written again (e.g. after a resume): swap, never leave a gap
            old = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync(root)
        _prune(root, keep)
    world.barrier()
    return final


def _files(directory: Path) -> list[str]:
    """Every file under directory, as sorted relative paths."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


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


def load_checkpoint(path: Path, engine, check: bool = True) -> dict:
    """Restore the engine's model and optimizer and the torch RNGs from `path` (every rank calls it); returns
    state.json's content. check=False skips the checksums (another rank verified them)."""
    problem = verify(path) if check else None
    if problem is not None:
        raise CheckpointError(f"cannot load checkpoint {path}: {problem}")
    state = read_state(path)
    engine.load(path, state.get("engine", {}))
    _set_torch_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state


def read_weights(path: Path, model: torch.nn.Module) -> None:
    """The model weights of checkpoint `path`, whatever engine wrote it, into a plain (unsharded) model."""
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"cannot load checkpoint {path}: {problem}")
    fmt = read_state(path).get("engine", {}).get("format", "safetensors")
    if fmt == "safetensors":
        from llmstable.parallel.engines import load_safetensors

        load_safetensors(path, model, None)
    elif fmt == "dcp":
        from llmstable.parallel.engines import load_dcp

        load_dcp(path, model, None)
    elif fmt == "deepspeed":
        from llmstable.parallel.deepspeed import read_deepspeed_weights

        weights = read_deepspeed_weights(path)
        own = model.state_dict()
        missing = [k for k in own if k not in weights and not (k == "lm_head.weight" and "tok_embeddings.weight" in weights)]
        if missing:
            raise CheckpointError(f"{path / 'deepspeed'} lacks weights {missing[:5]}: written with another model?")
        model.load_state_dict({k: weights[k] for k in own if k in weights}, strict=False)
    else:
        raise CheckpointError(f"{path / 'state.json'} names an unknown checkpoint format {fmt!r}")


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
