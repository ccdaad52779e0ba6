"""Stopping on a signal without losing work: how schedulers preempt (SLURM, Kubernetes and cloud spot instances send
SIGTERM, some SIGUSR1 first), and Ctrl-C.

A signal of `train.preempt_signals` (SIGTERM and SIGUSR1 by default), or SIGINT, only sets a flag. The loop reads
the flag at each step boundary through the step's one all-reduce (llmstable.step), and between evaluation batches
through a small all-reduce of its own, so every rank stops at the same point; it then writes a checkpoint, logs a
`preempted` event and stops with `Preempted`, which the command turns into exit code 75 (EX_TEMPFAIL: run the same
command again to resume; schedulers can requeue on it). A second SIGINT stops at once with one line and exit code
130, leaving the last checkpoint intact. Handlers are installed for the run and the previous ones restored after;
`llmstable train` installs them first thing, so a signal during start-up (imports, the config, the corpus, the
model) stops the run at its first step boundary too, and one after the last step leaves the finished run as it is.
"""

from __future__ import annotations

import os
import signal
import threading

EXIT_PREEMPTED = 75  # (as llmstable.errors, which maps Preempted to it)
EXIT_INTERRUPTED = 130


class Preempted(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; rerunning the command resumes it."""


class EvalInterrupted(Exception):
    """(Inside the trainer.) A preemption signal came during an evaluation, which stops there."""


class SignalFlag:
    """The preemption flag and the handlers that set it (installed only from the main thread)."""

    def __init__(self, signals: list[str]):
        self.signals = [getattr(signal, name) for name in signals if name != "SIGINT"] + [signal.SIGINT]
        self.received: str | None = None  # the name of the first signal received
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> SignalFlag:
        if threading.current_thread() is not threading.main_thread():
            return self  # (signal handlers can only be set from the main thread; a run in a thread has none)
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def narrow(self, signals: list[str]) -> SignalFlag:
        """(A command installs the default set first, before its config is known.) The flag for the run's own
        `signals` (and SIGINT), installed in place of this one; a signal this one received that the run does not
        handle gets its default action now, as it would have without llmstable."""
        self.uninstall()
        wanted = SignalFlag(signals)
        if self.received is not None and getattr(signal, self.received) not in wanted.signals:
            signal.raise_signal(getattr(signal, self.received))
        wanted.received = self.received
        return wanted.install()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            os.write(2, b"\ninterrupted again: stopping now, without a new checkpoint (the last one is intact)\n")
            os._exit(EXIT_INTERRUPTED)
        if self.received is None:
            self.received = name
            message = (f"\n{name} received: stopping after this step with a checkpoint"
                       f"{' (Ctrl-C again to stop at once)' if signum == signal.SIGINT else ''}\n")
            try:
                os.write(2, message.encode())
            except OSError:
                pass

