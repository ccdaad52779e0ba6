"""Whose directory is a run directory: the checks before anything is written into it, and the lock that keeps one
run per directory.

- `check_place`: run_dir must be a directory llmstable may write: not a regular file, not on a read-only mount.
- `is_run`: a directory holds an llmstable run: its event log (opening with the run's start), its metrics rows,
  checkpoint directories with their state.json, an llmstable config in Hydra's `.hydra/` of an earlier start, or a
  lock file naming the process that started one (killed before its first log line).
  Another program's files of the same names make no run. `train` refuses a non-empty directory that is not a run
  (nothing in it is touched), unless `resume=never run_dir_overwrite=true` moves its contents aside.
- `RunLock`: an exclusive POSIX record lock on `RUN_DIR/.llmstable.lock`, held for the process's lifetime (taken by
  the command before the run is built, and by `train()` for runs started from Python; reentrant within a process).
  The kernel releases it when the process dies, even by kill -9, and forked workers (data preparation) do not
  inherit it, so a lock left by a dead process is free and taken over with a message naming that process. POSIX
  also releases it when the process closes *any* descriptor of the file, so nothing here opens the lock file twice.
  A second run on a locked directory is refused with the process that holds it. Rank 0 holds the lock for every
  rank of a distributed run. A clean end empties the holder's record; a start refused before it was announced
  removes the lock file (and the directory) it made.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from llmstable.config import ConfigError

log = logging.getLogger("llmstable")

LOCK = ".llmstable.lock"
RUN_MARKERS = ("events.jsonl", "metrics.jsonl", "checkpoints", ".hydra")  # each checked by its content (_marks_run)
RUN_SECTIONS = {"model", "data", "optimizer", "train", "schedule"}  # the top-level keys of a run's config
_held: dict[str, tuple[int, int]] = {}  # resolved run_dir -> (file descriptor, how many holders in this process)
_unannounced: dict[str, tuple[bool, bool]] = {}  # run_dir -> (acquire made the directory, made the lock file)


def check_place(path: Path) -> None:
    """Refuse a run_dir that cannot be a directory of ours: an existing file, or a place that cannot be written."""
    if path.exists() and not path.is_dir():
        raise ConfigError([f"run_dir={str(path)!r} is an existing file, not a directory: point run_dir at a new or "
                           "existing directory"])
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only(existing):
        raise ConfigError([f"run_dir={str(path)!r} cannot be written ({existing} is "
                           f"{'on a read-only file system' if _read_only(existing) else 'not writable by this user'})"
                           ": point run_dir at a writable place"])


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def is_run(path: Path, ignore: set[str] = frozenset()) -> bool:
    """Whether directory `path` holds an llmstable run, or an earlier start of one (`ignore`: names this process
    wrote there itself, e.g. Hydra's files of this launch, which make no earlier run)."""
    return _started_here(path / LOCK) or any(_marks_run(path / name) for name in RUN_MARKERS if name not in ignore)


def _started_here(lock: Path) -> bool:
    """Whether the lock file names the llmstable process that started a run here (its holder record is written once
    the run is accepted and emptied at a clean end): a start killed before its first log line still owns the place."""
    try:  # (through this process's descriptor if it holds the lock: a second open and close would release it)
        held = str(lock.parent.resolve()) in _held
        holder = json.loads((held_lock_content(lock.parent) if held else lock.read_bytes()) or b"null")
    except (OSError, ValueError):
        return False
    return isinstance(holder, dict) and {"pid", "host", "command"} <= set(holder)


def _marks_run(path: Path) -> bool:
    """Whether `path` is what llmstable writes under that name; another program's file or folder of the same name
    (a Hydra app's `.hydra`, another trainer's `metrics.jsonl` or `checkpoints/step_1000.pt`) is not."""
    if path.name == "checkpoints":
        return path.is_dir() and any(p.is_dir() and (p.name.startswith(".tmp-step_") or (
            p.name.startswith("step_") and (p / "state.json").is_file())) for p in path.iterdir())
    if path.name == ".hydra":
        return _has_run_sections(path / "config.yaml")
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    if not isinstance(first, dict) or not isinstance(first.get("step"), int):
        return False
    if path.name == "events.jsonl":
        return first.get("event") == "start" and "engine" in first
    return "tokens" in first and any(key.startswith(("train/", "val/")) for key in first)  # metrics.jsonl


def _has_run_sections(path: Path) -> bool:
    """Whether a YAML file is an llmstable config (its top-level sections), without parsing more of it."""
    try:
        heads = {line.split(":", 1)[0] for line in path.read_text(encoding="utf-8").splitlines()
                 if line[:1].isalpha() and ":" in line}
    except (OSError, ValueError):
        return False
    return RUN_SECTIONS <= heads


def foreign_contents(path: Path, ignore: set[str] = frozenset()) -> list[str]:
    """The names in a non-empty directory that is not a run (empty when it is a run, empty, or absent). The lock
    file alone makes no run: it is written first, and this process may hold it."""
    ignore = {LOCK, *ignore}
    if not path.is_dir() or is_run(path, ignore):
        return []
    return sorted(p.name for p in path.iterdir() if p.name not in ignore)


def ownership_problem(path: Path, overwrite: bool, ignore: set[str] = frozenset()) -> str | None:
    """Why `train` must not use `path` as its run directory, or None."""
    foreign = foreign_contents(path, ignore)
    if not foreign or overwrite:
        return None
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    return (f"run_dir={str(path)!r} is not empty and holds no llmstable run ({shown}): a run would write its "
            "config.yaml, logs and checkpoints among these files. Point run_dir at a new or empty directory, or add "
            "resume=never run_dir_overwrite=true to move its contents aside to a RUN_DIR.replaced-TIME folder "
            "(nothing is deleted)")


class RunLock:
    """The run directory's lock (see the module doc). `acquire()` raises ConfigError naming the holder."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.key = str(run_dir.resolve())
        self.mine = False

    def acquire(self) -> RunLock:
        if self.key in _held:  # this process holds it already (the CLI took it before Hydra started)
            fd, count = _held[self.key]
            _held[self.key] = (fd, count + 1)
            self.mine = True
            return self
        made_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK
        made_file = not path.exists()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise ConfigError([f"run_dir={str(self.run_dir)!r}: cannot create its lock file {path} "
                               f"({err.strerror}): point run_dir at a writable place"]) from err
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError([f"run_dir={str(self.run_dir)!r}: cannot lock {path} ({err.strerror})"]) from err
            raise ConfigError([f"run_dir={str(self.run_dir)!r} is in use by {_describe(holder)}: two runs in one "
                               "directory would mix their logs and checkpoints. Wait for it to finish (or stop it: "
                               "it checkpoints on SIGTERM), or use another run_dir"]) from None
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            here = previous.get("host") == socket.gethostname()
            if here and not _alive(previous.get("pid")):
                log.warning("run_dir %s: took over the lock of %s, which is no longer running", self.run_dir,
                            _describe(previous))
        _held[self.key] = (fd, 1)
        _unannounced[self.key] = (made_dir, made_file)
        self.mine = True
        return self

    def announce(self) -> None:
        """Write who holds the lock into it (once the run is accepted: a refused command leaves the file as it
        was), for the message a second run gets."""
        if self.mine and self.key in _held:
            _write_holder(_held[self.key][0])
            _unannounced.pop(self.key, None)

    def release(self) -> None:
        if not self.mine or self.key not in _held:
            return
        fd, count = _held[self.key]
        self.mine = False
        if count > 1:
            _held[self.key] = (fd, count - 1)
            return
        del _held[self.key]
        made = _unannounced.pop(self.key, None)  # set: the run was refused before it started
        try:
            if made is None:
                os.ftruncate(fd, 0)  # a clean end leaves no holder: the next start has no lock to take over
            elif made[1]:  # a refused start leaves no trace: the lock file it made goes
                os.unlink(self.run_dir / LOCK)
        except OSError:
            pass
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)
        if made is not None and made[0]:
            try:
                self.run_dir.rmdir()  # (and the directory it made, if nothing else was written into it)
            except OSError:
                pass


def held_lock_content(run_dir: Path) -> bytes:
    """The lock file's bytes, read through the descriptor this process holds it by. Opening the file again and
    closing it would release the lock: POSIX drops a process's record locks on a file at any close of it."""
    fd, _ = _held[str(run_dir.resolve())]
    return os.pread(fd, os.fstat(fd).st_size, 0)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:500]}
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"process {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}: "
            f"{holder.get('command', '?')})")
