"""`llmstable report SWEEP_DIR`: report.md, report.json, loss_curves.png and (with an LR grid) lr_sensitivity.png,
from each run's own summary.json, metrics.jsonl, events.jsonl and config.yaml. Nothing is recomputed: every
number in the report is one of those files' numbers (or a mean and std of them across seeds).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from llmstable.metrics import read_jsonl
from llmstable.plot import final_curve
from llmstable.resume import flatten

TIMING = ("wall_s", "tokens_per_sec", "peak_memory_mb")  # the only fields that differ between identical reruns


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/summary.json"))


def tokens_to_target(rows: list[dict], target: float | None) -> int | None:
    if target is None:
        return None
    return next((tokens for tokens, v in final_curve(rows, "val/loss") if v <= target), None)


def run_row(run: Path, target: float | None) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    rows = read_jsonl(run / "metrics.jsonl")
    final = summary["final_val_loss"]
    finite = isinstance(final, float) and math.isfinite(final) and not summary.get("diverged")
    return {
        "run": run.name, "arm": cfg.get("name") or run.name, "lr": cfg["optimizer"]["lr"], "seed": cfg["train"]["seed"],
        "optimizer": cfg["optimizer"]["name"],
        "stabilizers": [k for k, v in (cfg.get("stabilizer") or {}).items() if v is not None],
        "diverged": not finite, "diverged_step": summary.get("diverged_step"),
        "final_val_loss": final if finite else None,
        "best_val_loss": summary["best_val_loss"] if finite else None,
        "final_val_ppl": math.exp(final) if finite else None,
        "tokens_to_target": tokens_to_target(rows, target),
        "spikes": summary.get("spikes", 0), "rollbacks": summary.get("rollbacks", 0),
        "skipped_steps": summary.get("skipped_steps", 0),
        "tokens": summary["tokens"], "tokens_per_sec": summary["tokens_per_sec"],
        "peak_memory_mb": summary.get("peak_memory_mb"), "wall_s": summary["wall_s"],
        "init_hash": summary.get("init_hash"), "first_batch_hash": summary.get("first_batch_hash"),
    }


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (arm, lr): mean and std across seeds, ranked by mean final validation loss (diverged last)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["lr"]), []).append(r)
    out = []
    for (arm, lr), runs in groups.items():
        entry = {"arm": arm, "lr": lr, "seeds": len(runs), "diverged": sum(r["diverged"] for r in runs)}
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
    ignore = ("run_dir", "train.init_from", "train.seed", "name")
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


def fmt(value, std=None, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) >= 1e4:
        text = f"{value:,.0f}"
    else:
        text = f"{value:.{digits}g}" if isinstance(value, float) else str(value)
    return text + (f" ± {std:.2g}" if std is not None else "")


def markdown(ranked: list[dict], rows: list[dict], fair: dict, target: float | None) -> str:
    lines = ["# Comparison report", "", f"{len(rows)} runs, {len(ranked)} arm x LR settings, ranked by final "
             "validation loss (mean ± std across seeds).", ""]
    head = ["rank", "arm", "lr", "seeds", "final val loss", "best val loss", "final ppl",
            f"tokens to {target}" if target is not None else "tokens to target", "spikes", "rollbacks",
            "skipped steps", "tokens/s", "peak MB", "wall s", "diverged"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, e in enumerate(ranked, 1):
        diverged = "-"
        if e["diverged"]:
            steps = [r["diverged_step"] for r in rows if r["arm"] == e["arm"] and r["lr"] == e["lr"] and r["diverged"]]
            diverged = f"{e['diverged']}/{e['seeds']} (step {', '.join(map(str, steps))})"
        cells = [str(i), e["arm"], fmt(e["lr"]), str(e["seeds"]),
                 fmt(e["final_val_loss"], e["final_val_loss_std"]), fmt(e["best_val_loss"], e["best_val_loss_std"]),
                 fmt(e["final_val_ppl"], e["final_val_ppl_std"]), fmt(e["tokens_to_target"]),
                 fmt(e["spikes"]), fmt(e["rollbacks"]), fmt(e["skipped_steps"]),
                 fmt(e["tokens_per_sec"], digits=5), fmt(e["peak_memory_mb"], digits=5), fmt(e["wall_s"], digits=4),
                 diverged]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Same start", ""]
    for seed, checks in fair["same_start_by_seed"].items():
        lines.append(f"- seed {seed}: identical initial weights: {'yes' if checks['initial_weights'] else 'NO'}; "
                     f"identical first batch: {'yes' if checks['first_batch'] else 'NO'}")
    lines += ["", "## What differs between runs", "", ", ".join(f"`{k}`" for k in fair["differs"]) or "nothing",
              "", "## Settings every run shares", ""]
    lines += [f"- `{k}`: {v}" for k, v in fair["shared"].items()]
    lines += ["", "![loss curves](loss_curves.png)"]
    if len({r["lr"] for r in rows}) > 1:
        lines += ["", "![LR sensitivity](lr_sensitivity.png)"]
    return "\n".join(lines) + "\n"


def write_report(root: Path, target_loss: float | None = None) -> Path:
    root = Path(root)
    runs = run_dirs(root)
    if not runs:
        raise FileNotFoundError(f"{root} holds no finished runs (no */summary.json): run the sweep first")
    rows = [run_row(r, target_loss) for r in runs]
    ranked = aggregate(rows)
    fair = fairness(runs, rows)
    (root / "report.json").write_text(json.dumps({"target_loss": target_loss, "ranked": ranked, "runs": rows,
                                                   "fairness": fair}, indent=2, default=str))
    plot_curves(root, runs, rows)
    if len({r["lr"] for r in rows}) > 1:
        plot_lr_sensitivity(root, rows)
    path = root / "report.md"
    path.write_text(markdown(ranked, rows, fair, target_loss))
    return path


def plot_curves(root: Path, runs: list[Path], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {}
    for run, row in zip(runs, rows):
        color = colors.setdefault((row["arm"], row["lr"]), f"C{len(colors) % 10}")
        metrics = read_jsonl(run / "metrics.jsonl")
        label = f"{row['arm']} lr={row['lr']:g}" if (row["arm"], row["lr"]) not in {
            (r["arm"], r["lr"]) for r in rows[: rows.index(row)]} else None
        for ax, key in ((ax_train, "train/loss"), (ax_val, "val/loss")):
            curve = [(t, v) for t, v in final_curve(metrics, key) if math.isfinite(v)]
            if curve:
                ax.plot(*zip(*curve), color=color, label=label, linewidth=1)
        for event in read_jsonl(run / "events.jsonl"):
            if event["event"] in ("spike", "rollback", "diverged", "abort") and "tokens" in event:
                ax_train.axvline(event["tokens"], color=color, linestyle="--" if event["event"] == "spike" else ":",
                                 linewidth=0.8, alpha=0.6)
    for ax, title in ((ax_train, "train loss (dashed: spikes, dotted: rollbacks)"), (ax_val, "validation loss")):
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "loss_curves.png", dpi=110)
    plt.close(fig)


def plot_lr_sensitivity(root: Path, rows: list[dict]) -> None:
    """Final validation loss against LR per arm, log x (Wortsman et al. 2023, arXiv 2309.14322, figure 1 style).
    Diverged runs are drawn as crosses at the top of the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    finite = [r["final_val_loss"] for r in rows if r["final_val_loss"] is not None]
    top = max(finite) + 0.5 if finite else 10.0
    for i, arm in enumerate(sorted({r["arm"] for r in rows})):
        points = {}
        for r in rows:
            if r["arm"] == arm:
                points.setdefault(r["lr"], []).append(r["final_val_loss"])
        lrs = sorted(points)
        ok = [(lr, statistics.fmean(v)) for lr, v in ((lr, [x for x in points[lr] if x is not None]) for lr in lrs) if v]
        bad = [lr for lr in lrs if all(x is None for x in points[lr])]
        if ok:
            ax.plot(*zip(*ok), "o-", color=f"C{i}", label=arm)
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=f"C{i}", markersize=9)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title("LR sensitivity (x: diverged)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "lr_sensitivity.png", dpi=110)
    plt.close(fig)


def report_command(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="llmstable report", description="Write the report of a sweep directory.")
    parser.add_argument("sweep_dir")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="validation loss for 'tokens to target' (default: the sweep file's target_loss)")
    ns = parser.parse_args(args)
    target = ns.target_loss
    sweep_file = Path(ns.sweep_dir) / "sweep.yaml"
    if target is None and sweep_file.exists():
        target = OmegaConf.load(sweep_file).get("target_loss")
    try:
        print(f"report: {write_report(Path(ns.sweep_dir), target)}")
    except FileNotFoundError as err:
        print(f"error: {err}", file=__import__('sys').stderr)
        return 2
    return 0
