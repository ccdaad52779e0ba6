"""The run directory and what continues a run: claiming the directory, choosing the checkpoint to resume from,
checking config changes, saving and restoring checkpoints. The trainer hands over its `state_dict()`; this module
decides where it goes and where it comes from (llmstable.checkpoint does the file format).

One run per run directory: rank 0 first checks that run_dir is a place llmstable may write and that it is empty or
an llmstable run, then locks it for the process's lifetime (llmstable.rundir); a directory of other files, or one
another process is training in, is refused before anything is written. Then:
- `resume=auto` continues from the newest readable checkpoint. Unreadable ones (bad checksums, files missing from
  the manifest, garbage state.json, no config.yaml, whatever the reason) are skipped with a warning that names the
  file; when every checkpoint is unreadable the run is refused with a list of each one and its problem.
- `resume=never` starts over. In a directory that already holds a readable run it is refused unless
  `run_dir_overwrite=true`, which moves the earlier run aside to `RUN_DIR.replaced-TIME` (nothing is deleted); an
  earlier run whose checkpoints are all unreadable is moved aside the same way without asking.
- `resume=PATH` resumes that checkpoint, or fails with an error that names it and its problem.
`config.yaml` is written only once the resume check has passed, so a refused resume leaves the run as it was.
Every rank calls the same methods; rank 0 reads the directory and broadcasts what it decided. Checkpoints are saved
through llmstable.checkpointer (a snapshot in the loop, the write in the background, the rollback ring).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from llmstable import checkpoint as ckpt
from llmstable.checkpointer import Checkpointer
from llmstable.config import ConfigError, TrainConfig, flatten, load_config, to_dict
from llmstable.rng import set_rng_state
from llmstable.rundir import LOCK, RunLock, check_place, foreign_contents, held_lock_content, ownership_problem

log = logging.getLogger("llmstable")

STATE_KEYS = ("step", "tokens", "loss_sum", "loss_steps", "val_history", "data", "stabilizers")

# Keys (dotted prefixes) that may change when a run is resumed; each change is logged. Everything else would
# change what the run is (model shape, tokenizer, data, seed, optimizer type, architecture switches) and is
# refused unless resume_force=true.
HARMLESS = (
    "optimizer.lr", "optimizer.weight_decay", "optimizer.compiled", "optimizer.impl", "schedule.",
    "train.budget_tokens", "train.max_steps", "train.max_norm", "train.device", "train.precision", "train.compile",
    "train.deterministic",
    "train.log_interval", "train.eval_interval", "train.eval_samples", "train.checkpoint_interval",
    "train.keep_checkpoints", "train.progress", "train.sample_tokens", "train.plot", "train.micro_batch_size",
    "logging.", "run_dir", "resume", "resume_force", "fault.", "data.cache_dir", "data.workers", "data.shard_tokens",
    "stabilizer.spike_guard", "name",
    "stabilizer.zloss", "distributed.",  # the engine may change: the checkpoint loader says which formats it reads
)


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(harmless, breaking) changes between two resolved configs, each as 'key: old -> new'."""
    a, b = flatten(old), flatten(new)
    harmless, breaking = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        line = f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}"
        (harmless if key.startswith(HARMLESS) else breaking).append(line)
    return harmless, breaking


def problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed (naming the file), or None: the checkpoint checks of
    llmstable.checkpoint.verify, a config.yaml that parses, and the state the trainer needs."""
    found = ckpt.verify(path)
    if found is not None:
        return found
    try:
        stored = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    except Exception as err:  # noqa: BLE001  (yaml and OmegaConf raise several kinds)
        return f"{path / 'config.yaml'} is not readable YAML: {err}"
    if not isinstance(stored, dict):
        return f"{path / 'config.yaml'} does not hold a config mapping"
    state = ckpt.read_state(path)
    missing = [k for k in STATE_KEYS if k not in state]
    if missing or not isinstance(state.get("data"), dict) or "ordinal" not in state["data"]:
        return f"{path / 'state.json'} lacks {missing or ['data.ordinal']}: not written by llmstable's trainer"
    return None


@dataclass
class Claim:
    """What claiming a run directory decided: the checkpoint to resume from (None: start over), and whether its
    checksums were read on the way (so the load that follows need not read them again)."""

    resume_from: Path | None
    verified: bool = False
    config_changes: tuple[str, ...] = ()  # the harmless changes since that checkpoint (the others were refused)


class RunDirectory:
    """Rank 0 reads and writes the run directory; every rank calls these methods alike."""

    def __init__(self, cfg: TrainConfig, world):
        self.cfg, self.world = cfg, world
        self.path = Path(cfg.run_dir)
        self.checkpoints = self.path / "checkpoints"
        guard = cfg.stabilizer.spike_guard
        self.checkpointer = Checkpointer(self.checkpoints, world, cfg.train.keep_checkpoints,
                                         background=cfg.train.checkpoint_async,
                                         ring_size=guard.ring_size if guard is not None else 0)
        self.lock = RunLock(self.path)
        self.foreign: list[str] = []  # what a non-run directory held before this run took it (moved aside)
        self.verified: set[Path] = set()  # checkpoints whose checksums this process has just read (claim)

    @property
    def last_checkpoint_bytes(self) -> int | None:
        return self.checkpointer.last_bytes  # (to warn before a save that will not fit)

    # --- before the run starts -----------------------------------------------------------------------------------

    def take(self) -> None:
        """(Rank 0.) Check that run_dir may be written and holds nothing but an llmstable run, then lock it. Raises
        ConfigError naming run_dir and the fix; nothing is written into a directory that is refused."""
        check_place(self.path)
        overwrite = self.cfg.run_dir_overwrite and self.cfg.resume == "never"
        ours = _hydra_files(self.path)  # (Hydra's files of this launch)
        found = ownership_problem(self.path, overwrite, ours)
        if found is not None:
            raise ConfigError([found])
        self.foreign = foreign_contents(self.path, ours)
        self.lock.acquire()

    def claim(self, decided: Claim | None = None) -> Claim:
        """Take the run directory (checked, locked) and decide what to resume from (moving an earlier run aside to
        start over); every rank gets rank 0's decision. `decided`: what this process's command already claimed (it
        holds the lock; the decision is not taken again). Raises a ConfigError or CheckpointError on every rank
        when the run must not start."""
        outcome: object = None
        if self.world.is_main:
            try:
                if decided is None:
                    self.take()
                    path = self._choose()
                    changes = tuple(self.check_config_changes(path)) if path is not None else ()
                    decided = Claim(path, verified=path is not None, config_changes=changes)  # (its checks hashed it)
                    self.lock.announce()
                else:
                    self.lock.acquire()  # (held already: this counts this directory's second holder)
                outcome = decided
            except (ConfigError, ckpt.CheckpointError) as err:
                self.lock.release()
                outcome = err
            except BaseException:
                self.lock.release()
                raise
        outcome = self.world.broadcast(outcome)
        if isinstance(outcome, Exception):
            raise outcome
        if outcome.verified and outcome.resume_from is not None:
            self.verified.add(Path(outcome.resume_from))
        return outcome

    def close(self, clean: bool = True) -> None:
        """The end of the run (every rank): wait for the checkpoint being written, then unlock. After an error
        (clean=False) a failure of that write is not raised over the first error."""
        try:
            if clean:
                self.checkpointer.wait()
            else:
                try:
                    self.checkpointer.wait()
                except ckpt.CheckpointError as err:
                    log.warning("%s", err)
        finally:
            self.lock.release()

    def _choose(self) -> Path | None:
        resume, found = self.cfg.resume, ckpt.list_checkpoints(self.checkpoints)
        for path in found:
            if (warning := ckpt.misnamed(path)) is not None:
                log.warning(warning)
        if resume == "never":
            if found:
                readable = next((p for p in found if problem(p) is None), None)  # (the newest readable one)
                if readable is not None and not self.cfg.run_dir_overwrite:
                    raise ConfigError([
                        f"resume=never, but run_dir={str(self.path)!r} already holds a run (its checkpoints go up to "
                        f"{readable.name}): starting over there would mix two runs. Use a new run_dir, or add "
                        "run_dir_overwrite=true to move the earlier run aside (nothing is deleted)"])
            if found or self.foreign:
                moved = self.move_aside()
                log.warning("resume=never: moved the earlier %s in %s aside to %s",
                            "run" if found else "contents", self.path, moved)
            return None
        if resume == "auto":
            problems = []
            for path in found:
                found_problem = problem(path)
                if found_problem is None:
                    return path
                log.warning("skipping unreadable checkpoint %s: %s", path, found_problem)
                problems.append(f"{path.name}: {found_problem}")
            if problems:
                raise ckpt.CheckpointError(
                    f"every checkpoint in {self.checkpoints} is unreadable, so run_dir={str(self.path)!r} cannot be "
                    "resumed:\n  - " + "\n  - ".join(problems) + "\nNothing was changed. To start over, run the same "
                    "command with resume=never (the unreadable run is moved aside, nothing is deleted), or use a "
                    "new run_dir")
            return None
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError([f"resume={resume!r} is not a checkpoint directory: use auto, never, or a path such "
                               "as RUN_DIR/checkpoints/step_00000100"])
        found_problem = problem(path)
        if found_problem is not None:
            raise ckpt.CheckpointError(f"resume={resume!r} cannot be used: {found_problem}. Point resume at another "
                                       "checkpoint, or use resume=auto to take the newest readable one")
        return path

    def move_aside(self) -> Path:
        """Move the earlier run's files to a new sibling folder RUN_DIR.replaced-TIME (deleting nothing); files that
        Hydra already wrote there for this process stay."""
        target = self.path.with_name(f"{self.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while target.exists():
            n += 1
            target = target.with_name(f"{self.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        target.mkdir()
        ours = {*_hydra_files(self.path), LOCK}
        for entry in sorted(self.path.iterdir()):
            if entry.name not in ours:
                os.rename(entry, target / entry.name)
        if not self.foreign:  # the lock stays (this process holds it); the old run keeps a copy of its content,
            (target / LOCK).write_bytes(held_lock_content(self.path))  # read through the held descriptor
        return target

    def check_config_changes(self, path: Path) -> list[str]:
        """The harmless config changes since checkpoint `path` (with the breaking ones under resume_force=true);
        the breaking ones are refused unless resume_force=true. Run when the directory is claimed, before anything
        is written into it."""
        stored = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
        try:  # keys added to the schema since the checkpoint was written count as their defaults
            stored = to_dict(load_config(stored))
        except ConfigError:
            pass  # (a config the current schema refuses: compare it as written)
        harmless, breaking = config_changes(stored, to_dict(self.cfg))
        if breaking and not self.cfg.resume_force:
            raise ConfigError([f"cannot resume {path} with a changed config: {c}" for c in breaking] + [
                "these change the model, data, seed or optimizer type: use a new run_dir, or pass "
                "resume_force=true to resume anyway"])
        return harmless + (breaking if self.cfg.resume_force else [])

    def write_config(self) -> None:
        if self.world.is_main:
            (self.path / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(self.cfg)))

    def write_tokenizer(self, tokenizer) -> None:
        if self.world.is_main and not (self.path / "tokenizer").exists():
            tokenizer.save_pretrained(str(self.path / "tokenizer"))

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save(self, engine, step: int, state: dict, good: bool, before_commit=None) -> Path:
        """Checkpoint `step` (llmstable.checkpointer: the loop blocks for a snapshot; the write may go on)."""
        return self.checkpointer.save(engine, step, state, OmegaConf.to_yaml(to_dict(self.cfg)), good, before_commit)

    def checkpoint_due(self, step: int) -> bool:
        """Whether a checkpoint is written after `step`: every train.checkpoint_interval steps, and at the end."""
        interval = self.cfg.train.checkpoint_interval
        return bool(interval and step % interval == 0) or step == self.cfg.total_steps

    def space_warning(self, step: int) -> str | None:
        """(Before a step that ends with a checkpoint.) A warning when the free space is below the size of the last
        checkpoint, so the user hears of it before the step is spent."""
        if not self.world.is_main or not self.last_checkpoint_bytes:
            return None
        free = ckpt.free_bytes(self.checkpoints)
        if free >= self.last_checkpoint_bytes:
            return None
        message = (f"the checkpoint after step {step} will probably not fit: {free:,} bytes free on the filesystem of "
                   f"{self.checkpoints}, the last checkpoint took {self.last_checkpoint_bytes:,}. Free some space or "
                   "lower train.keep_checkpoints; if the write fails, the run stops with exit code 5 and the earlier "
                   "checkpoints stay intact")
        log.warning(message)
        return message

    def load(self, engine, path: Path, step: int | None = None) -> dict:
        """Restore the engine's model and optimizer and every RNG from checkpoint `path` (verified and trust-
        checked on rank 0); returns its state.json. A rollback passes the checkpoint's `step`: if the ring holds
        its snapshot, that is restored instead, with no disk read (same values)."""
        snap = self.checkpointer.from_ring(step) if step is not None else None
        if self.world.broadcast(snap is not None if self.world.is_main else None):
            if snap is None:
                raise ckpt.CheckpointError(f"rank {self.world.rank} lacks the in-memory copy of {path} that rank 0 "
                                           "restores from: the ranks' saves went out of step")
            engine.restore_snapshot(snap.engine)
            set_rng_state(snap.rng)
            return snap.state()
        outcome: object = None
        if self.world.is_main:
            try:
                found = None if path in self.verified else ckpt.verify(path)  # (the claim just hashed it)
                self.verified.discard(path)
                if found is not None:
                    raise ckpt.CheckpointError(f"cannot load checkpoint {path}: {found}")
                ckpt.check_trusted(path, self.cfg.resume_trust, "resume_trust=true")
            except ckpt.CheckpointError as err:
                outcome = err
        outcome = self.world.broadcast(outcome)
        if isinstance(outcome, Exception):
            raise outcome
        return ckpt.load_checkpoint(path, engine, check=False)

    def latest_good(self) -> Path | None:
        """The newest checkpoint marked good: one whose snapshot the ring holds is taken as written (this process
        wrote it), any other must pass verification (its checksums are read)."""
        self.checkpointer.wait()
        found = None
        if self.world.is_main:
            for path in ckpt.list_checkpoints(self.checkpoints):
                in_ring = self.checkpointer.from_ring(ckpt.content_step(path)) is not None
                if ckpt.is_good(path) and (in_ring or ckpt.verify(path) is None):
                    found = path
                    break
        return self.world.broadcast(found)

    def step_and_ordinal(self, path: Path) -> tuple[int, int]:
        """(Rank 0.) The step and data position saved in checkpoint `path` (from the ring when it holds it)."""
        snap = self.checkpointer.from_ring(ckpt.content_step(path))
        state = snap.state() if snap is not None else ckpt.read_state(path)
        return state["step"], int(state["data"]["ordinal"])

    def mark_good(self, step: int) -> None:
        self.checkpointer.mark_good(step)

    def abandon_after(self, step: int) -> None:
        """After a rollback to `step` (every rank): the checkpoints of later steps, in memory and on disk, hold a
        branch the run abandoned; a resume or a preemption must never return to it."""
        self.checkpointer.wait()
        self.checkpointer.forget_after(step)
        if self.world.is_main:
            for path in ckpt.list_checkpoints(self.checkpoints):
                if ckpt.content_step(path) > step:
                    shutil.rmtree(path)


def _hydra_files(run_dir: Path) -> set[str]:
    """The names Hydra wrote into run_dir for this process (its .hydra folder and the job log), if it did."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return set()
        hydra = HydraConfig.get()
        if Path(hydra.runtime.output_dir).resolve() != run_dir.resolve():
            return set()
        return {name for name in (hydra.output_subdir, f"{hydra.job.name}.log") if name}
    except Exception:  # noqa: BLE001  (no Hydra, or not in a Hydra app)
        return set()
