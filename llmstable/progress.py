"""Progress of long work, readable both on a terminal and in a scheduler's log.

On a terminal it is tqdm's live bar. Where stderr is not a terminal (SLURM, a cloud job, `2> log`), a bar is one
ever-growing line of carriage returns, so `Progress` writes a plain line instead, every `interval_s` seconds
(`LLMSTABLE_PROGRESS_S`, 20 by default) from a small timer thread, so a line comes even while one step takes long:

    train: 120/489 steps (24.5%), 1.31 steps/s, ETA 4m42s, elapsed 1m32s | loss=4.512 lr=2.96e-03 tok_s=5,402

Work shorter than one interval writes nothing, and work that wrote a line writes a last one when it ends. The
methods are tqdm's that the callers use (`update`, `set_postfix`, `reset`, `close`), so a tqdm bar swaps for it
one for one. `prepare`, the preparation of a corpus on first use, `train`, `compare` (runs finished, polled from
the sweep directory) and `generate` use it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

DEFAULT_INTERVAL_S = 20.0


def interval_s() -> float:
    try:
        return max(0.05, float(os.environ.get("LLMSTABLE_PROGRESS_S", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def on_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """A counter of `unit`s done out of `total` (None: unknown), shown as a live bar on a terminal (unless
    bar=False) and as a plain line every interval elsewhere. `poll`, if given, is called at each line to read the
    count (work done by other processes). enabled=False shows nothing."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", initial: int = 0, enabled: bool = True,
                 bar: bool = True, poll: Callable[[], int] | None = None, stream=None):
        self.desc, self.total, self.unit, self.poll = desc, total, unit, poll
        self.stream = stream or sys.stderr
        self.count = initial
        self.postfix: dict[str, Any] = {}
        self._start = (time.monotonic(), initial)
        self._bar = None
        self._lines = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not enabled:
            return
        if on_terminal(self.stream):
            if bar:
                from tqdm import tqdm

                self._bar = tqdm(desc=desc, total=total, unit=unit, initial=initial, file=self.stream,
                                 dynamic_ncols=True)
                if poll is not None:
                    self._start_timer("_refresh_bar", 1.0)
        else:
            self._start_timer("_write_line", interval_s())

    # --- tqdm's methods ------------------------------------------------------------------------------------------

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def update_to(self, count: int) -> None:
        self.update(count - self.count)

    def set_postfix(self, fields: dict[str, Any] | None = None, refresh: bool = True, **more: Any) -> None:
        self.postfix = {**(fields or {}), **more}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=refresh)

    def reset(self, total: int | None = None) -> None:
        """Back to 0 (tqdm's reset): after a rollback, the caller updates to the step it went back to."""
        self.total = total if total is not None else self.total
        self.count = 0
        self._start = (time.monotonic(), 0)
        if self._bar is not None:
            self._bar.reset(total=total)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self._lines:  # the last line of work that wrote any
                self._write_line()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the plain line ------------------------------------------------------------------------------------------

    def line(self) -> str:
        """`desc: done/total unit (pct), rate, ETA, elapsed | postfix`, as written to a log."""
        if self.poll is not None:
            self.count = self.poll()
        elapsed = time.monotonic() - self._start[0]
        rate = (self.count - self._start[1]) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.count:,}/{self.total:,} {self.unit}s ({100 * self.count / max(self.total, 1):.1f}%)"
                 if self.total else f"{self.count:,} {self.unit}s"]
        parts.append(f"{rate:.3g} {self.unit}s/s")
        if self.total and rate > 0:
            parts.append(f"ETA {duration(max(self.total - self.count, 0) / rate)}")
        parts.append(f"elapsed {duration(elapsed)}")
        text = f"{self.desc}: {', '.join(parts)}"
        if self.postfix:
            text += " | " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def _write_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._lines += 1

    def _refresh_bar(self) -> None:
        if self._bar is not None and self.poll is not None:
            self._bar.n = self.count = self.poll()
            self._bar.refresh()

    def _start_timer(self, method: str, every_s: float) -> None:
        """Call `method` every every_s seconds until close(). The thread holds only a weak reference, so work that
        ends by an exception without closing its progress stops the lines once the progress is dropped."""
        ref, stop = weakref.ref(self), self._stop

        def tick():
            while not stop.wait(every_s):
                progress = ref()
                if progress is None:
                    return
                try:
                    getattr(progress, method)()
                except Exception:  # noqa: BLE001  (a progress line must never stop the work it reports)
                    pass
                del progress

        self._thread = threading.Thread(target=tick, name=f"progress-{self.desc}", daemon=True)
        self._thread.start()

    def __del__(self) -> None:
        self._stop.set()


def duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 75 -> '1m15s', 4.2 -> '4s'."""
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
