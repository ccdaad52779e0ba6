"""Checkpoints: written atomically, verified by a manifest of checksums, loaded without unpickling objects.

Layout of `RUN_DIR/checkpoints/step_00000100/`:
- the model and optimizer, in the engine's format (llmstable.parallel.engines): `model.safetensors` and
  `optimizer.pt` (one process, DDP; loaded with `weights_only=True`), `dcp/` (FSDP2: sharded by
  torch.distributed.checkpoint) or `deepspeed/` (DeepSpeed ZeRO);
- `rng.pt`: every RNG state, torch (CPU and CUDA), python and numpy (llmstable.rng.rng_state; loaded with
  `weights_only=True`);
- `state.json`: step and token counters, the data loader's position, and whatever else the trainer needs to
  continue;
- `config.yaml`: the resolved config of the run that wrote it;
- `manifest.json`, written last by rank 0 once every rank has written its shards: the size and SHA-256 of every
  other file, shards included.

A checkpoint is written into a hidden temporary directory, every file is fsync'd, and the directory is renamed
into place; a crash at any point leaves either the whole checkpoint or none. A write that fails (a full disk, any
OSError) removes its temporary directory and raises `CheckpointWriteError`, naming the path and the space free
and needed; the previous checkpoints are untouched.

`verify` accepts a checkpoint only if its manifest lists every file in it, every listed file matches its size and
checksum, the files a loader reads are all listed, and `state.json` is readable. The manifest is also signed with
the writer's key (llmstable.trust): formats whose files are read with pickle (DCP, DeepSpeed) are loaded only if
the signature is this user's, or the user opts in.

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

from llmstable import trust
from llmstable.config.engines import checkpoint_format
from llmstable.rng import rng_state, set_rng_state
from llmstable.tensorfiles import describe_misfit, fit_problems, load_weights_only, read_safetensors

MANIFEST = "manifest.json"
GOOD = "GOOD"
PREFIX = "step_"
UNLISTED = (MANIFEST, GOOD, f".{GOOD}.tmp")  # written after the manifest
# The files a loader reads, per format (besides state.json, config.yaml and rng.pt, which every format has).
# The files a loader reads, per format: what each engine declares (llmstable.config.engines: checkpoint_files).


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory or file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions, I/O error). The partial write is removed and the
    previous checkpoints are intact; the CLI exits with code 5."""


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
    try:
        if world.is_main:
            _fresh(tmp)
        world.barrier()
        engine.save(tmp)
        world.barrier()
        if before_commit is not None:
            before_commit()
        if world.is_main:
            _write_rest_and_commit(tmp, final, step, rng_state(), json.dumps(state, indent=1), config_yaml, good)
    except Exception as err:  # noqa: BLE001  (safetensors and torch.save report a full disk as their own errors)
        _give_up(root, tmp, final, err, world.is_main)
    if world.is_main:
        _prune(root, keep, step)
    world.barrier()
    return final


def write_snapshot(root: Path, snapshot, write_engine_files, keep: int, before_commit=None,
                   good: bool = False) -> Path:
    """(One process, any thread: llmstable.checkpointer's writer.) Checkpoint `snapshot.step` from a snapshot taken
    earlier (llmstable.snapshot): the engine's files by `write_engine_files(directory, snapshot.engine)`, then the
    rest, the manifest and the rename, exactly as save_checkpoint; then pruning."""
    final = root / checkpoint_name(snapshot.step)
    tmp = root / f".tmp-{final.name}"
    try:
        _fresh(tmp)
        write_engine_files(tmp, snapshot.engine)
        if before_commit is not None:
            before_commit()
        _write_rest_and_commit(tmp, final, snapshot.step, snapshot.rng, snapshot.state_json, snapshot.config_yaml,
                               good)
    except Exception as err:  # noqa: BLE001
        _give_up(root, tmp, final, err, True)
    _prune(root, keep, snapshot.step)
    return final


def _fresh(tmp: Path) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()


def _give_up(root: Path, tmp: Path, final: Path, err: BaseException, main: bool) -> None:
    needed = checkpoint_bytes(latest_valid(root, warn=False))
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half checkpoint filling the disk
    raise CheckpointWriteError(write_failure(final, err, needed)) from err


def _write_rest_and_commit(tmp: Path, final: Path, step: int, rng: dict, state_json: str, config_yaml: str,
                           good: bool) -> None:
    """(Rank 0.) The files besides the engine's, the signed manifest over all of them, then the rename."""
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(state_json)
    (tmp / "config.yaml").write_text(config_yaml)
    files = _files(tmp)
    for name in files:
        _fsync(tmp / name)
    manifest: dict[str, Any] = {"step": step, "files": {n: {"bytes": (tmp / n).stat().st_size,
                                                             "sha256": _sha256(tmp / n)} for n in files}}
    signature = trust.sign(manifest)
    if signature is not None:
        manifest["signature"] = signature
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    if good:
        (tmp / GOOD).write_text(str(step))
        _fsync(tmp / GOOD)
    for sub in sorted({(tmp / n).parent for n in files}, reverse=True):
        _fsync(sub)
    root = final.parent
    if final.exists():  # the same step written again (e.g. after a resume): swap, never leave a gap
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(root)


def checkpoint_bytes(path: Path | None) -> int | None:
    """The size of a checkpoint on disk (an estimate of the next one's), or None without one."""
    if path is None:
        return None
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def free_bytes(directory: Path) -> int:
    """Free space on the filesystem that holds directory (or its nearest existing parent)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def write_failure(final: Path, err: BaseException, needed: int | None) -> str:
    free = free_bytes(final.parent)
    reason = f"{err.strerror} ({err.filename})" if isinstance(err, OSError) and err.strerror else repr(err)
    need = f"the previous checkpoint took {needed:,} bytes" if needed else "no previous checkpoint to size it by"
    return (f"could not write checkpoint {final}: {reason}. {free:,} bytes are free on its filesystem and {need}. "
            f"The partial write was removed and the earlier checkpoints in {final.parent} are intact. Free some "
            f"space (or lower train.keep_checkpoints, or point run_dir at a larger disk), then run the same command "
            f"again: it resumes from the newest checkpoint")


def _files(directory: Path) -> list[str]:
    """Every file under directory, as sorted relative paths."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories, newest first by the step recorded inside them (`content_step`), not
    by their name: a renamed directory never passes for a newer one (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    steps = {p: content_step(p) for p in dirs}
    return sorted(dirs, key=lambda p: (steps[p], steps[p] == name_step(p), name_step(p)), reverse=True)


def name_step(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def content_step(path: Path) -> int:
    """The step a checkpoint directory holds: its manifest's (which the checksums cover), else its state.json's,
    else (neither readable: verify() will refuse it anyway) the one in its name."""
    for name in (MANIFEST, "state.json"):
        try:
            step = json.loads((path / name).read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    return name_step(path)


def misnamed(path: Path) -> str | None:
    """A warning when a checkpoint directory's name disagrees with the step inside it, else None."""
    step = content_step(path)
    if step == name_step(path):
        return None
    return (f"checkpoint directory {path} holds step {step} (its manifest says so) but is named for step "
            f"{name_step(path)}: it counts as step {step}. Rename it to {checkpoint_name(step)} or remove it")


def read_manifest(path: Path) -> dict:
    """The manifest of checkpoint `path`, checked for shape; raises CheckpointError naming the file."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{manifest_file} is missing (the write was interrupted, or this is not a checkpoint)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{manifest_file} is unreadable: {err}") from err
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{manifest_file} lists no files")
    for name, meta in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(meta, dict) or not isinstance(
                meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
            raise CheckpointError(f"{manifest_file} has a malformed entry {name!r}: {meta!r}")
    return manifest


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong, naming the file: the manifest lists
    every file present and every file a loader reads, each listed file matches its size and SHA-256, and
    state.json is a JSON object with the step and a known format. (It reads every byte: a run's start does it once,
    when it chooses the checkpoint, and its load then trusts that choice: llmstable.resume.Claim.)"""
    try:
        manifest = read_manifest(path)
        files = manifest["files"]
        state = _check_files(path, files)
    except CheckpointError as err:
        return str(err)
    if manifest.get("step", state["step"]) != state["step"]:
        return (f"{path / MANIFEST} says step {manifest.get('step')!r} but {path / 'state.json'} holds step "
                f"{state['step']}: the checkpoint was changed after it was written")
    fmt = state_format(state)
    writer = checkpoint_format(fmt)
    if writer is None:
        return f"{path / 'state.json'} names an unknown checkpoint format {fmt!r}"
    for required in writer.checkpoint_files:
        if not any(n == required or (required.endswith("/") and n.startswith(required)) for n in files):
            return f"{path / required} is not in {MANIFEST}: the {fmt} checkpoint is incomplete"
    return None


def _check_files(path: Path, files: dict) -> dict:
    unlisted = sorted(set(_files(path)) - set(UNLISTED) - set(files))
    if unlisted:
        raise CheckpointError(f"{path / unlisted[0]} is not listed in {path / MANIFEST}: the checkpoint was changed "
                              "after it was written")
    for name in ("state.json", "config.yaml", "rng.pt"):
        if name not in files:
            raise CheckpointError(f"{path / name} is not listed in {path / MANIFEST}")
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file} does not match its checksum in {MANIFEST}")
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'state.json'} is not valid JSON: {err}") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'state.json'} is not an llmstable checkpoint state (no integer 'step')")
    return state


def state_format(state: dict) -> str:
    engine = state.get("engine")
    return engine.get("format", "safetensors") if isinstance(engine, dict) else "safetensors"


def check_trusted(path: Path, trusted: bool, opt_in: str) -> None:
    """Refuse a checkpoint in a pickle-bearing format (DCP, DeepSpeed) that was not written under this account,
    unless the user trusts it (see llmstable.trust)."""
    fmt = state_format(read_state(path))
    writer = checkpoint_format(fmt)
    if writer is not None and writer.pickled_checkpoint and not trusted and not trust.signed_here(read_manifest(path)):
        raise CheckpointError(trust.untrusted_message(path, fmt, opt_in))


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


def latest_valid(root: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint that passes verification; broken ones are skipped with a warning."""
    for path in list_checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path
        if warn:
            warnings.warn(f"skipping unreadable checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(path: Path, engine, check: bool = True, trusted: bool = False) -> dict:
    """Restore the engine's model and optimizer and the torch RNGs from `path` (every rank calls it); returns
    state.json's content. check=False skips the checksums and the trust check (another rank did them)."""
    if check:
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"cannot load checkpoint {path}: {problem}")
        check_trusted(path, trusted, "resume_trust=true")
    state = read_state(path)
    engine.load(path, state.get("engine", {}))
    rng = load_weights_only(path / "rng.pt", "Resume from another checkpoint (resume=PATH), or start a new run_dir")
    if "torch" not in rng:  # written before every RNG went into rng.pt: torch's here, the others in state.json
        old = state.get("rng") or {"python": state.get("rng_python"), "numpy": state.get("rng_numpy")}
        rng = {"torch": rng, **{k: v for k, v in old.items() if v is not None}}
    set_rng_state(rng)
    return state


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def load_initial_weights(model: torch.nn.Module, path: Path) -> None:
    """Weights from a safetensors file, in our parameter names or Hugging Face's (`llmstable export OUT`, then
    OUT/model.safetensors); parameters the file lacks (an arm's QK-norm weights) keep their init. A file that is not
    safetensors (a pickle) is refused before it is read; a tensor that does not fit is named with both shapes."""
    from llmstable.model.names import to_ours

    what = f"train.init_from={str(path)!r}"
    weights = to_ours(read_safetensors(path, what))
    wrong = fit_problems({k: list(v.shape) for k, v in weights.items()},
                         {k: list(v.shape) for k, v in model.state_dict().items()})
    if wrong:
        raise CheckpointError(f"{what} does not fit this model: {describe_misfit(wrong)}. Build the model it was made "
                              "for (model=..., model.vocab_size, the same tokenizer), or start from another file")
    model.load_state_dict(weights, strict=False)


def _prune(root: Path, keep: int, step: int) -> None:
    """After writing `step`: delete all but the newest `keep` up to that step, never the newest good one. A later
    step's checkpoint belongs to another branch (one a resume skipped as unreadable, or one past an explicit
    resume=PATH): it is neither counted, which would prune each new checkpoint as soon as it is written, nor deleted
    (the run replaces it when it writes that step)."""
    good = latest_good(root, check_files=False)
    for path in [p for p in list_checkpoints(root) if content_step(p) <= step][keep:]:
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
