"""Whose directory is a run directory: the checks before anything is written into it, and the lock that keeps one
run per directory.

- `check_place`: run_dir must be a directory llmstable may write: not a regular file, not on a read-only mount.
- `is_run`: a directory holds an llmstable run (its lock file, its logs, its checkpoints, or Hydra's files of an
  earlier start). `train` refuses a non-empty directory that is not a run (nothing in it is touched), unless
  `resume=never run_dir_overwrite=true` moves its contents aside.
- `RunLock`: an exclusive POSIX record lock on `RUN_DIR/.llmstable.lock`, held for the process's lifetime (taken by
  the command before Hydra writes its files, and by `train()` for runs started from Python; reentrant within a
  process). The kernel releases it when the process dies, even by kill -9, and forked workers (data preparation)
  do not inherit it, so a lock left by a dead process is free and taken over with a message naming that process. A second run on a locked directory is refused with the
  process that holds it. Rank 0 holds the lock for every rank of a distributed run.
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
_held: dict[str, tuple[int, int]] = {}  # resolved run_dir -> (file descriptor, how many holders in this process)


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
    return any(_marks_run(path / name) for name in RUN_MARKERS if name not in ignore)


def _marks_run(path: Path) -> bool:
    """Whether `path` is what llmstable writes under that name (a user's own file of the same name is not)."""
    if path.name == "checkpoints":
        return path.is_dir() and any(p.name.startswith("step_") or p.name.startswith(".tmp-step_")
                                     for p in path.iterdir())
    if path.name == ".hydra":
        return (path / "config.yaml").is_file()
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "step" in first and ("event" in first or path.name == "metrics.jsonl")


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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK
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
        self.mine = True
        return self

    def announce(self) -> None:
        """Write who holds the lock into it (once the run is accepted: a refused command leaves the file as it
        was), for the message a second run gets."""
        if self.mine and self.key in _held:
            _write_holder(_held[self.key][0])

    def release(self) -> None:
        if not self.mine or self.key not in _held:
            return
        fd, count = _held[self.key]
        self.mine = False
        if count > 1:
            _held[self.key] = (fd, count - 1)
            return
        del _held[self.key]
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)


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
