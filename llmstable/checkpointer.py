"""Checkpoints off the step path, and the last few kept in CPU memory for rollbacks.

`Checkpointer.save` blocks the loop only to take a snapshot (llmstable.snapshot: the engine's tensors copied to CPU
memory, pinned on CUDA; the RNG states; the trainer state as JSON). A background thread then writes it in
llmstable.checkpoint's format (files, fsync, the SHA-256 manifest, the atomic rename, pruning), one checkpoint at a
time: a save first waits for the previous write. A crash during the background write leaves only a hidden temporary
directory, which no resume takes for a checkpoint. A failed write (a full disk) is raised in the loop at the next
step boundary (`check`) as the CheckpointWriteError a synchronous save would have raised, the earlier checkpoints
intact. Marking a checkpoint good waits for its write, so GOOD still means "on disk, verified, and followed by
enough clean steps".

Engines that checkpoint sharded state with collectives (FSDP2's DCP, DeepSpeed: `can_snapshot = False`), and
`train.checkpoint_async=false`, save in the step path as before.

The ring (`stabilizer.spike_guard.ring_size`): the snapshots of the last saves stay in CPU memory (the newest good
one is kept while there is room for it). A rollback to a checkpoint whose snapshot is there restores from memory,
with no disk read; the ring only serves a checkpoint that is committed and marked good on disk, so it is never the
only copy of a state.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

from llmstable import checkpoint as ckpt
from llmstable.rng import rng_state
from llmstable.snapshot import Snapshot, nbytes


class Checkpointer:
    """Saves of one run directory's checkpoints (every rank calls the same methods; rank 0 writes)."""

    def __init__(self, root: Path, world, keep: int, background: bool, ring_size: int):
        self.root, self.world, self.keep = root, world, keep
        self.background, self.ring_size = background, ring_size
        self.ring: OrderedDict[int, Snapshot] = OrderedDict()
        self.good_step: int | None = None  # the newest checkpoint marked good (kept in the ring while it can be)
        self.last_bytes: int | None = None  # the size of the last checkpoint written (to warn before a full disk)
        self.blocked_s = 0.0  # time the loop spent in save() (the snapshot, or the whole synchronous write)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._committed: list[tuple[int, Path]] = []  # written since the last `completed()` call

    # --- saving ------------------------------------------------------------------------------------------------

    def save(self, engine, step: int, state: dict, config_yaml: str, good: bool, before_commit=None) -> Path:
        """Checkpoint `step`: a snapshot now and a background write, or (engines that cannot snapshot, or
        checkpoint_async=false without a ring) the whole write now. Returns the directory it is (being) written to."""
        import time

        started = time.perf_counter()
        self.wait()  # one write at a time; a failure of the previous one is raised here
        final = self.root / ckpt.checkpoint_name(step)
        if not engine.can_snapshot or not (self.background or self.ring_size):
            path = ckpt.save_checkpoint(self.root, step, engine, state, config_yaml, self.keep, before_commit, good)
            self._done(step, path)
            self.blocked_s += time.perf_counter() - started
            return path
        snap = Snapshot(step, engine.snapshot(), rng_state(), json.dumps(state, indent=1), config_yaml)
        snap.nbytes = nbytes(snap.engine)
        self._remember(snap)
        if not self.world.is_main:  # rank 0 writes; a fault meant to hit another rank mid-checkpoint hits it here
            if before_commit is not None:
                before_commit()
        elif self.background:
            self._thread = threading.Thread(target=self._write, args=(snap, engine, good, before_commit),
                                            name=f"llmstable-checkpoint-{step}", daemon=False)
            self._thread.start()
        else:
            self._write(snap, engine, good, before_commit)
            self.wait()
        self.blocked_s += time.perf_counter() - started
        return final

    def _write(self, snap: Snapshot, engine, good: bool, before_commit) -> None:
        try:
            path = ckpt.write_snapshot(self.root, snap, engine.write_snapshot, self.keep, before_commit, good)
        except BaseException as err:  # noqa: BLE001  (handed to the loop's thread, which raises it)
            self._error = err
            return
        self._done(snap.step, path)

    def _done(self, step: int, path: Path) -> None:
        if self.world.is_main:
            self.last_bytes = ckpt.checkpoint_bytes(path)
        self._committed.append((step, path))

    def wait(self) -> None:
        """Block until the background write (if any) is committed; raise its failure as a CheckpointWriteError."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def check(self) -> None:
        """(Each step boundary, without blocking.) Raise the background write's failure, if it failed."""
        if self._error is not None and (self._thread is None or not self._thread.is_alive()):
            err, self._error = self._error, None
            if isinstance(err, ckpt.CheckpointError):
                raise err
            raise ckpt.CheckpointWriteError(f"the background checkpoint write failed: {err!r}") from err

    @property
    def writing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def completed(self) -> list[tuple[int, Path]]:
        """The checkpoints committed since the last call, (step, path), oldest first (for the run's events)."""
        done, self._committed = self._committed, []
        return done

    # --- good checkpoints and the ring -------------------------------------------------------------------------

    def mark_good(self, step: int) -> None:
        self.wait()  # on disk before it is called good
        path = self.root / ckpt.checkpoint_name(step)
        if self.world.is_main and path.is_dir():  # (it may have been pruned meanwhile)
            ckpt.mark_good(path)
        self.good_step = step

    def _remember(self, snap: Snapshot) -> None:
        if self.ring_size <= 0:
            return
        self.ring[snap.step] = snap
        self.ring.move_to_end(snap.step)
        while len(self.ring) > self.ring_size:
            oldest = next((s for s in self.ring if s != self.good_step), next(iter(self.ring)))
            del self.ring[oldest]

    def from_ring(self, step: int) -> Snapshot | None:
        """The snapshot of checkpoint `step` if the ring still holds it."""
        return self.ring.get(step)

    def forget_after(self, step: int) -> None:
        """After a rollback to `step`: the snapshots of later steps describe a future that will not happen."""
        for later in [s for s in self.ring if s > step]:
            del self.ring[later]
