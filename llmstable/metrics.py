"""The run directory's record: metrics.jsonl, events.jsonl, summary.json, and the optional wandb and TensorBoard
sinks. See the README's "Run directory" section for the contract these files keep.

Rows are appended and flushed line by line, so a killed run leaves every row it logged readable. A crash in the
middle of a write can still leave a partial last line; before a resumed run appends anything, that partial line is
cut off (and reported as a `log_repaired` event), so the first new row starts on a line of its own.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from llmstable.config import LoggingConfig
from llmstable.records import read_jsonl  # noqa: F401  (reading the logs back lives in llmstable.records)


class RunLog:
    """Appends metric rows and events to the run directory and forwards metrics to the opt-in sinks."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, config_dict: dict):
        self.run_dir = run_dir
        repaired = {name: cut for name in ("metrics.jsonl", "events.jsonl") if (cut := cut_partial_line(run_dir / name))}
        self.metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.events_file = open(run_dir / "events.jsonl", "a", encoding="utf-8")
        for name, cut in repaired.items():
            self.event("log_repaired", 0, file=name, bytes_cut=len(cut), text=cut[:200].decode("utf-8", "replace"))
        self._wandb = None
        self._tb = None
        if cfg.wandb != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project, config=config_dict, dir=str(run_dir), mode=cfg.wandb,
                name=run_dir.name, resume="allow", id=_wandb_id(run_dir),
            )
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def metrics(self, row: dict[str, Any]) -> None:
        """One row of metrics.jsonl; must carry `step` and `tokens`."""
        _write_line(self.metrics_file, row)
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "tokens")}
        if self._wandb is not None:
            self._wandb.log(values, step=row["step"])
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, global_step=row["step"])

    def event(self, event: str, step: int, **fields: Any) -> None:
        """One row of events.jsonl: {"event": ..., "step": ..., "time": ..., **fields}."""
        _write_line(self.events_file, {"event": event, "step": step, "time": round(time.time(), 3), **fields})

    def summary(self, summary: dict[str, Any]) -> None:
        path = self.run_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_finite(summary), indent=2))
        tmp.replace(path)
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        self.metrics_file.close()
        self.events_file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


class StepMeter:
    """What one metrics row reports about the steps since the previous row: the mean train/loss (its running sum is
    part of the checkpoint, so a resumed run logs the same rows), the throughput, and the peak memory seen."""

    def __init__(self, flops_per_token: float, device):
        self.flops_per_token, self.device = flops_per_token, device
        self.loss_sum, self.loss_steps = 0.0, 0
        self.peak_memory_mb = 0.0
        self.restart(0)

    def add(self, loss: float) -> None:
        self.loss_sum += loss
        self.loss_steps += 1

    def restart(self, tokens: int) -> None:
        """Time the next row's throughput from now (after a start, resume or rollback)."""
        self.since = (time.perf_counter(), tokens)

    def row(self, step: int, tokens: int, lr: float, grad_norm: float, extra: dict) -> dict[str, Any]:
        """The row for the steps since the last one; starts the next."""
        from llmstable.device import memory_mb

        now = time.perf_counter()
        tokens_per_sec = (tokens - self.since[1]) / max(now - self.since[0], 1e-9)
        row = {"step": step, "tokens": tokens, "train/loss": self.loss_sum / self.loss_steps, "optim/lr": lr,
               "optim/grad_norm": grad_norm, "perf/tokens_per_sec": tokens_per_sec,
               "perf/flops_per_sec": tokens_per_sec * self.flops_per_token, **extra}
        self.peak_memory_mb = max(self.peak_memory_mb, memory_mb(self.device))
        self.loss_sum, self.loss_steps = 0.0, 0
        self.since = (now, tokens)
        return row

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "loss_steps": self.loss_steps}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum, self.loss_steps = state["loss_sum"], state["loss_steps"]


def run_summary(val_history: list, ledger, aborted: bool, diverged_step: int | None, step: int,
                **fields: Any) -> dict[str, Any]:
    """summary.json: the run's outcome (see the README's run-directory table)."""
    final_val = val_history[-1][1] if val_history else None
    return {
        "steps": step, "tokens": fields.pop("tokens"),
        "final_val_loss": final_val, "best_val_loss": min((v for _, v in val_history), default=None),
        **{k: fields.pop(k) for k in ("wall_s", "tokens_per_sec", "resumed_from_step", "num_params",
                                      "non_embedding_params", "flops_per_token", "engine", "world_size")},
        "spikes": ledger.spikes, "rollbacks": ledger.rollbacks,
        "skipped_steps": ledger.skipped_steps, "skipped_samples": ledger.skipped_samples,
        "lr_cuts": ledger.lr_cuts, "moment_resets": ledger.moment_resets,
        "aborted": aborted, "diverged": aborted or diverged_step is not None,
        "diverged_step": diverged_step if diverged_step is not None else (step + 1 if aborted else None),
        **fields,
    }


class QuietLog:
    """The log of ranks other than 0: the run directory has one writer."""

    def metrics(self, row: dict[str, Any]) -> None:
        pass

    def event(self, event: str, step: int, **fields: Any) -> None:
        pass

    def summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def cut_partial_line(path: Path) -> bytes:
    """Truncate a trailing line without its newline (a write a crash interrupted) from `path`; returns what was cut
    (b"" when the file ends cleanly or does not exist). Warns, naming the file and the size."""
    import logging
    import os

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return b""
    if size == 0:
        return b""
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return b""
        keep, end = 0, size  # keep: the offset after the last newline; searched backwards, 1 MB at a time
        while end > 0:
            start = max(0, end - (1 << 20))
            f.seek(start)
            chunk = f.read(end - start)
            if b"\n" in chunk:
                keep = start + chunk.rfind(b"\n") + 1
                break
            end = start
        f.seek(keep)
        cut = f.read()
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    logging.getLogger("llmstable").warning("%s ended in a partial line (%d bytes, a write cut short by a crash): "
                                           "removed before appending", path, len(cut))
    return cut


def _write_line(f, row: dict) -> None:
    f.write(json.dumps(_finite(row)) + "\n")
    f.flush()


def _finite(row: dict) -> dict:
    """JSON has no NaN or Infinity: write them as strings so every line stays valid JSON."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _wandb_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
