"""What a user sees when a command cannot do what was asked: one `error:` paragraph and an exit code, never a
traceback (unless asked for one).

Every `llmstable` command runs through `run_command`. An exception that means bad input carries its own message,
naming the key or file, what is wrong and the fix; such exceptions are recognised by the name of their class (or
of a base class), listed in `USER_ERRORS`, so that this module imports none of the modules that define them: no
torch for `llmstable spikes`, and no import cycle. An `OSError` (a read-only disk, a missing permission, a path
that is a file) is named with its path and the usual fix. Anything else is a bug, or an input nothing checks yet:
the paragraph says where it was raised and how to get the traceback for a report.

Exit codes (the README lists them):

    0    done (or already complete)
    1    an unexpected error: a bug; rerun with --debug for the traceback
    2    bad input: a config key, a data file, a checkpoint or another file; the message names it and the fix
    3    the spike guard aborted (the last good checkpoint is intact)
    4    the spike guard's replays suspect the machine (silent data corruption)
    5    a checkpoint could not be written (disk full or another OSError; the earlier ones are intact)
    75   training stopped by a preemption signal or Ctrl-C after writing a checkpoint: run it again to resume
    130  interrupted (Ctrl-C; a second Ctrl-C during training)

`--debug` anywhere on the command line, or `LLMSTABLE_DEBUG=1`, prints the traceback before the paragraph.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Callable

EXIT_OK, EXIT_BUG, EXIT_ERROR, EXIT_ABORTED, EXIT_HARDWARE, EXIT_WRITE_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
EXIT_PREEMPTED = 75
DEBUG_FLAG = "--debug"

# Exceptions whose message is written for the user: class (module.name) -> (exit code, the paragraph's first word).
# A subclass is matched through its bases, so a new kind of DataError needs no row here.
USER_ERRORS: dict[str, tuple[int, str]] = {
    "llmstable.config.checks.ConfigError": (EXIT_ERROR, "error"),
    "llmstable.data.corpus.DataError": (EXIT_ERROR, "error"),
    "llmstable.checkpoint.CheckpointWriteError": (EXIT_WRITE_FAILED, "error"),
    "llmstable.checkpoint.CheckpointError": (EXIT_ERROR, "error"),
    "llmstable.export.ExportError": (EXIT_ERROR, "error"),
    "llmstable.tensorfiles.TensorFileError": (EXIT_ERROR, "error"),
    "llmstable.generate.GenerateError": (EXIT_ERROR, "error"),
    "llmstable.errors.UsageError": (EXIT_ERROR, "error"),
    "llmstable.trainer.SpikeAbort": (EXIT_ABORTED, "aborted"),
    "llmstable.preemption.Preempted": (EXIT_PREEMPTED, "stopped"),
    "llmstable.stabilizers.hooks.SuspectedHardwareFault": (EXIT_HARDWARE, "stopped: suspected hardware fault"),
    "hydra.errors.HydraException": (EXIT_ERROR, "error: the config does not compose"),
    "omegaconf.errors.OmegaConfBaseException": (EXIT_ERROR, "error: the config does not compose"),
}

OS_FIXES = {  # errno -> what to do about it
    errno.EROFS: "the file system is read-only: choose a path on a writable disk",
    errno.EACCES: "permission denied: fix the permissions, or choose a path you can write",
    errno.EPERM: "operation not permitted: choose a path you own",
    errno.ENOSPC: "the disk is full: free some space, or choose a path on a larger disk",
    errno.EDQUOT: "the disk quota is exceeded: free some space, or choose a path on another disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder where a file was expected: choose another path",
    errno.EEXIST: "it already exists: remove it or choose another path",
    errno.ENOENT: "it does not exist: check the path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
}


class UsageError(ValueError):
    """Command-line arguments that do not parse; the message names the argument and shows the usage."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reporting a bad argument through the one error path (`error: ...`, exit 2) rather than
    its own `prog: error:` lines."""

    def error(self, message: str):
        raise UsageError(f"{message}; {' '.join(self.format_usage().split())}")  # ("usage: prog ...")


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether to show tracebacks, argv without the --debug flag). LLMSTABLE_DEBUG=1 also asks for them."""
    env = os.environ.get("LLMSTABLE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    return env or DEBUG_FLAG in argv, [a for a in argv if a != DEBUG_FLAG]


def set_debug(on: bool) -> None:
    """Remember the choice for the whole process (and the processes it starts, such as a sweep's runs)."""
    if on:
        os.environ["LLMSTABLE_DEBUG"] = "1"


def run_command(command: Callable[[list[str]], int | None], args: list[str]) -> int:
    """Run one command; any exception becomes one paragraph on stderr and the matching exit code."""
    try:
        return command(args) or EXIT_OK
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001  (KeyboardInterrupt too: no traceback on Ctrl-C)
        return report(err)


def report(err: BaseException) -> int:
    """Print err as the user should see it (with the traceback first under --debug); returns the exit code."""
    if debug_requested([])[0]:
        traceback.print_exception(err)
    code, text = classify(err)
    print(text, file=sys.stderr, flush=True)
    return code


def classify(err: BaseException) -> tuple[int, str]:
    """(exit code, the paragraph) for an exception."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C)"
    for cls in type(err).__mro__:
        known = USER_ERRORS.get(f"{cls.__module__}.{cls.__qualname__}")
        if known is not None:
            code, prefix = known
            return code, f"{prefix}: {str(err).strip() or type(err).__name__}"
    if isinstance(err, OSError):
        return EXIT_ERROR, f"error: {os_message(err)}"
    if type(err).__name__ == "UnpicklingError":  # (a load llmstable.tensorfiles does not guard: torch's advice, to
        return EXIT_ERROR, UNPICKLING  # load the file with weights_only=False, must never reach the user)
    if isinstance(err, MemoryError):
        return EXIT_ERROR, ("error: out of memory: lower train.micro_batch_size (or data.workers for prepare), or run "
                            "on a machine with more memory")
    return EXIT_BUG, unexpected(err)


UNPICKLING = ("error: a file holds a pickle that asks for more than tensors, and the weights-only reader refused "
              "it (such a pickle can run code): use a file llmstable wrote, or convert it where you trust it")


def os_message(err: OSError) -> str:
    """An OSError as one sentence: what failed on which path, and the usual fix."""
    what = err.strerror or str(err) or type(err).__name__
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    fix = OS_FIXES.get(err.errno, "check the path and its permissions")
    return f"{what}: {paths} ({fix})" if paths else f"{what} ({fix})"


def unexpected(err: BaseException) -> str:
    """The paragraph for an exception nothing names: where it was raised, and how to get the traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        ours = next((f for f in reversed(frames) if f"{os.sep}llmstable{os.sep}" in f.filename), None)
        where = f" (raised at {_short(last)}" + (f", from {_short(ours)}" if ours and ours is not last else "") + ")"
    message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return (f"error: unexpected {type(err).__name__}{': ' + message if message else ''}{where}. This is a bug in "
            "llmstable, or an input it does not check yet: rerun the same command with --debug (or "
            "LLMSTABLE_DEBUG=1) to see the traceback, and report it with the command you ran.")


def _short(frame: traceback.FrameSummary) -> str:
    parts = frame.filename.split(os.sep)
    return f"{os.sep.join(parts[-2:])}:{frame.lineno} in {frame.name}"
