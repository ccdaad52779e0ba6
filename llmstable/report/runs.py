"""One row per run, read from the run's own summary.json, metrics.jsonl and config.yaml, and the table of every
(arm, LR) setting with its mean and std across seeds; the check that runs with the same seed started alike."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from llmstable.records import read_events, read_metrics, skipped_warning
from llmstable.loss_plot import final_curve
from llmstable.config import flatten
from llmstable.report.spikes import spike_rows

TIMING = ("wall_s", "tokens_per_sec", "peak_memory_mb")  # the only fields that differ between identical reruns
BUDGET_TAG = "_budget"  # in the directory name of the baseline's runs at a fraction of the budget (llmstable.compare)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/summary.json"))


SUMMARY_KEYS = ("final_val_loss", "best_val_loss", "tokens", "tokens_per_sec", "wall_s")
CONFIG_KEYS = ("optimizer.lr", "optimizer.name", "train.seed", "data.seq_len")


def readable_runs(root: Path, target: float | None = None) -> tuple[list[Path], list[dict], list[str]]:
    """(run directories, their rows, warnings): the directories of `root` with a summary.json that are runs of
    llmstable train. One that is not (a foreign directory, a damaged summary.json or config.yaml) is skipped, with
    the reason, instead of stopping the report; damaged lines of a run's logs are skipped and reported too."""
    runs, rows, skipped = [], [], []
    for run in run_dirs(root):
        reason = run_problem(run)
        if reason is None:
            try:
                rows.append(run_row(run, target, skipped))
                runs.append(run)
                continue
            except (KeyError, TypeError, ValueError, AttributeError) as err:  # a value of the wrong kind in it
                reason = f"{type(err).__name__}: {err}"
        skipped.append(f"skipping {run}: not a run of llmstable train ({reason})")
    return runs, rows, skipped


def run_problem(run: Path) -> str | None:
    """Why `run` is not a readable llmstable run (naming the file), or None."""
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{run / 'summary.json'} is not readable JSON: {err}"
    missing = [k for k in SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
    if missing:
        return f"{run / 'summary.json'} lacks {missing}"
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    except Exception as err:  # noqa: BLE001  (a missing file, yaml's and OmegaConf's errors)
        return f"{run / 'config.yaml'} is missing or not readable: {str(err).splitlines()[0][:120]}"
    flat = flatten(cfg) if isinstance(cfg, dict) else {}
    missing = [k for k in CONFIG_KEYS if k not in flat]
    return f"{run / 'config.yaml'} lacks {missing}" if missing else None


def tokens_to_target(rows: list[dict], target: float | None) -> int | None:
    if target is None:
        return None
    return next((tokens for tokens, v in final_curve(rows, "val/loss") if v <= target), None)


def planned_tokens(cfg: dict) -> int:
    """The run's budget as configured (a diverged run stops before it)."""
    train = cfg["train"]
    if train.get("budget_tokens") is not None:
        return int(train["budget_tokens"])
    return int(train["max_steps"]) * int(train["global_batch_size"]) * int(cfg["data"]["seq_len"])


def schedule_steps(cfg: dict) -> tuple[int, int]:
    """The run's optimizer steps and its LR warm-up in steps, as the trainer computes them (the warm-up is
    schedule.warmup_fraction of the steps when set, else schedule.warmup_steps)."""
    from llmstable.config import ScheduleConfig
    from llmstable.schedule import warmup_steps

    train = cfg["train"]
    per_step = int(train["global_batch_size"]) * int(cfg["data"]["seq_len"])
    steps = int(train["max_steps"]) if train.get("max_steps") is not None else -(-planned_tokens(cfg) // per_step)
    fields = ScheduleConfig.__dataclass_fields__  # (a run from before warmup_fraction existed lacks that key)
    schedule = ScheduleConfig(**{k: v for k, v in (cfg.get("schedule") or {}).items() if k in fields})
    return steps, warmup_steps(steps, schedule)


def step_counts(cfg: dict) -> dict:
    """The optimizer's own hyperparameters counted in steps (OptimizerConfig.step_counts) and their values."""
    from llmstable.config import OptimizerConfig

    variant = OptimizerConfig.variant(cfg["optimizer"].get("name"))
    return {k: cfg["optimizer"].get(k) for k in (variant.step_counts if variant else ())}


def run_row(run: Path, target: float | None, warnings: list[str] | None = None) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    state_bytes, num_params = summary.get("optimizer_state_bytes"), summary.get("num_params")
    rows = _read(read_metrics, run / "metrics.jsonl", warnings)
    final = summary["final_val_loss"]
    tuned_key = next(iter(cfg.get("tune") or {}), None)  # an arm tuned over one more key (configs/arm/ `tune`)
    finite = isinstance(final, float) and math.isfinite(final) and not summary.get("diverged")
    steps, warmup = schedule_steps(cfg)
    return {
        "run": run.name, "arm": cfg.get("name") or run.name, "lr": cfg["optimizer"]["lr"], "seed": cfg["train"]["seed"],
        "optimizer": cfg["optimizer"]["name"],
        "tuned_key": tuned_key, "tuned_value": flatten(cfg).get(tuned_key) if tuned_key else None,
        "stabilizers": [k for k, v in (cfg.get("stabilizer") or {}).items() if v is not None],
        "diverged": not finite, "diverged_step": summary.get("diverged_step"),
        "final_val_loss": final if finite else None,
        "best_val_loss": summary["best_val_loss"] if finite else None,
        "final_val_ppl": math.exp(final) if finite else None,
        "tokens_to_target": tokens_to_target(rows, target),
        "spikes": summary.get("spikes", 0), "rollbacks": summary.get("rollbacks", 0),
        "skipped_steps": summary.get("skipped_steps", 0), "skipped_samples": summary.get("skipped_samples", 0),
        "tokens": summary["tokens"], "planned_tokens": planned_tokens(cfg), "budget_run": BUDGET_TAG in run.name,
        "total_steps": steps, "warmup_steps": warmup,
        "schedule": (cfg.get("schedule") or {}).get("name", "cosine"),  # (the schema's default when absent)
        "optimizer_step_counts": step_counts(cfg),
        "initial_loss": summary.get("initial_loss"), "num_params": num_params, "optimizer_state_bytes": state_bytes,
        "optimizer_state_bytes_per_param": state_bytes / num_params if state_bytes is not None and num_params else None,
        "tokens_per_sec": summary["tokens_per_sec"],
        "peak_memory_mb": summary.get("peak_memory_mb"), "wall_s": summary["wall_s"],
        "init_hash": summary.get("init_hash"), "first_batch_hash": summary.get("first_batch_hash"),
        "spike_events": run_spikes(run, warnings),
    }


def run_spikes(run: Path, warnings: list[str] | None = None) -> list[dict]:
    """The run's spikes, early warnings and SDC suspects as `llmstable spikes` lists them (step, metric, value,
    threshold, action, the block it came from, the skipped samples, and the tokens seen)."""
    path = run / "events.jsonl"
    return spike_rows(_read(read_events, path, warnings))


def _read(reader, path: Path, warnings: list[str] | None) -> list[dict]:
    """reader(path)'s rows ([] without the file), a warning about the lines it skipped added to `warnings`."""
    if not path.is_file():
        return []
    problems: list[str] = []
    rows = reader(path, problems)
    if warnings is not None and (warning := skipped_warning(path, problems)):
        warnings.append(warning.removeprefix("warning: "))
    return rows


def tuned_label(entry: dict) -> str:
    """An arm's name, with the value of its tuned key when it has one: `adamw_clip (max_norm=0.25)`."""
    if entry.get("tuned_key") is None:
        return entry["arm"]
    return f"{entry['arm']} ({entry['tuned_key'].rsplit('.', 1)[-1]}={entry['tuned_value']})"


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (arm, tuned value, lr): mean and std across seeds, ranked by mean final validation loss (diverged
    last)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["tuned_key"], r["tuned_value"], r["lr"]), []).append(r)
    out = []
    for (arm, tuned_key, tuned_value, lr), runs in groups.items():
        entry = {"arm": arm, "tuned_key": tuned_key, "tuned_value": tuned_value, "lr": lr, "seeds": len(runs),
                 "seed_list": sorted(r["seed"] for r in runs),
                 "diverged": sum(r["diverged"] for r in runs)}
        for key in ("final_val_loss", "best_val_loss", "final_val_ppl", "tokens_to_target", "spikes", "rollbacks",
                    "skipped_steps", "tokens_per_sec", "peak_memory_mb", "wall_s"):
            values = [r[key] for r in runs if r[key] is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(entry)
    return sorted(out, key=lambda e: (e["diverged"] > 0, e["final_val_loss"] if e["final_val_loss"] is not None
                                      else math.inf))


def fairness(runs: list[Path], rows: list[dict]) -> dict:
    """The settings every run shares, what differs, and whether runs with the same seed really started alike."""
    flat = [flatten(OmegaConf.to_container(OmegaConf.load(r / "config.yaml"))) for r in runs]
    keys = set().union(*flat)
    ignore = ("run_dir", "train.init_from", "train.seed", "name", "lr_grid", "tune")
    shared = {k: flat[0].get(k) for k in sorted(keys) if all(f.get(k) == flat[0].get(k) for f in flat)
              and not k.startswith(ignore)}
    differs = sorted(k for k in keys if k not in shared and not k.startswith(ignore))
    same_start = {}
    for seed in sorted({r["seed"] for r in rows}):
        group = [r for r in rows if r["seed"] == seed]
        same_start[str(seed)] = {
            "initial_weights": len({r["init_hash"] for r in group}) == 1,
            "first_batch": len({r["first_batch_hash"] for r in group}) == 1,
        }
    return {"shared": shared, "differs": differs, "same_start_by_seed": same_start}
