"""The report's three plots, drawn from the run rows and the study (llmstable.report.study): final loss against LR
per arm, each arm's best run, and the speedup per arm with its interval (both laws beyond the measured budgets)."""

from __future__ import annotations

import math
from pathlib import Path

from llmstable.records import read_events, read_metrics
from llmstable.loss_plot import final_curve
from llmstable.report.study import best_runs


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lr_sensitivity(root: Path, rows: list[dict], study: dict) -> None:
    """Final validation loss (mean over seeds) against LR per arm, log x (Wortsman et al. 2023, arXiv 2309.14322,
    figure 1 style). An LR where a seed diverged is a cross at the top of the axis; the best LR is ringed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    finite = [r["final_val_loss"] for r in rows if r["final_val_loss"] is not None]
    top = max(finite) + 0.3 if finite else 10.0
    for i, arm in enumerate(study["arms"]):
        color = f"C{i % 10}"
        points = {float(lr): v for lr, v in arm["mean_final_val_loss_by_lr"].items()}
        ok = sorted((lr, v) for lr, v in points.items() if v is not None)
        bad = sorted(lr for lr, v in points.items() if v is None)
        if ok:
            ax.plot(*zip(*ok), "o-", color=color, label=arm["arm"])
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=color, markersize=9, label=None if ok else arm["arm"])
        if arm["best_lr"] is not None:
            ax.plot([arm["best_lr"]], [arm["selection_final_val_loss"]], "o", markersize=14, markerfacecolor="none",
                    color=color)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (mean over the selection seeds)")
    ax.set_title("final loss against LR (x: diverged, ring: best LR)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "lr_sensitivity.png", dpi=100)
    plt.close(fig)


def plot_best_runs(root: Path, rows: list[dict], study: dict) -> None:
    """Train and validation loss of each arm's best-LR runs (every seed), with spikes (dashed, labelled L<block> with
    the block they came from) and rollbacks (dotted) marked from events.jsonl."""
    plt = _pyplot()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, arm in enumerate(study["arms"]):
        color = f"C{i % 10}"
        runs = best_runs(rows, arm)
        for k, row in enumerate(runs):
            run = root / row["run"]
            metrics = read_metrics(run / "metrics.jsonl")
            label = f"{arm['arm']} lr={arm['best_lr']:g}" if k == 0 else None
            for ax, key in ((ax_train, "train/loss"), (ax_val, "val/loss")):
                curve = [(t, v) for t, v in final_curve(metrics, key) if math.isfinite(v)]
                if curve:
                    ax.plot(*zip(*curve), color=color, label=label, linewidth=1, alpha=1.0 if k == 0 else 0.5)
            for event in read_events(run / "events.jsonl") if (run / "events.jsonl").is_file() else ():
                if event["event"] in ("spike", "rollback") and "tokens" in event:
                    ax_train.axvline(event["tokens"], color=color, linewidth=0.8, alpha=0.6,
                                     linestyle="--" if event["event"] == "spike" else ":")
                if event["event"] == "spike" and event.get("layer") is not None and "tokens" in event:
                    ax_train.annotate(f"L{event['layer']}", (event["tokens"], 0.02), xycoords=("data", "axes fraction"),
                                      ha="left", fontsize=7, color=color)  # the block that moved first
    for ax, title in ((ax_train, "train loss at each arm's best LR (dashed: spikes, L<i> their block; dotted: "
                                 "rollbacks)"),
                      (ax_val, "validation loss")):
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "loss_curves.png", dpi=100)
    plt.close(fig)


def plot_speedup(root: Path, study: dict) -> None:
    """Speedup D_eff / D per arm with its 95% interval (a bar): a filled dot when read from the baseline's measured
    points; beyond them one hollow marker per law (circle: power law, square: log-linear), a refused law named in
    words at the row's left edge; log x."""
    plt = _pyplot()
    arms = study["arms"]
    fig, ax = plt.subplots(figsize=(7.5, 0.8 * len(arms) + 1.5))
    markers = {"power_law": ("o", 0.15), "log_linear": ("s", -0.15)}
    for y, arm in enumerate(arms):
        color, sp = f"C{y % 10}", arm["speedup"]
        notes = []  # (dy, text) written at the row's left edge
        if sp["method"] == "interpolated" and sp["value"] is not None:
            points = [("o", 0.0, sp["value"], sp["interval"], color)]
        elif sp["method"] == "extrapolated":
            points = [(markers[f][0], markers[f][1], e["value"], e["interval"], "none")
                      for f, e in sp["families"].items() if e["value"] is not None]
            notes = [(markers[f][1], f"{f.replace('_', ' ')}: refused") for f, e in sp["families"].items()
                     if e["value"] is None]
        else:
            points, notes = [], [(0.0, "unavailable")]
        for dy, text in notes:
            ax.text(0.01, y + dy, text, transform=ax.get_yaxis_transform(), fontsize=7, va="center", color=color)
        for marker, dy, value, interval, face in points:
            if interval:
                ax.plot(interval, [y + dy] * 2, "-", color=color, linewidth=3, alpha=0.5)
            ax.plot([value], [y + dy], marker, color=color, markerfacecolor=face, markersize=8)
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(arms)), [a["arm"] for a in arms])
    ax.set_xlabel(f"speedup over {study['baseline']}: D_eff / D (bars: 95% interval over the paired seeds)")
    for marker, face, label in (("o", "grey", "from the baseline's measured points"),
                                ("o", "none", "beyond them: power law (free floor)"),
                                ("s", "none", "beyond them: log-linear")):
        ax.plot([], [], marker, color="grey", markerfacecolor=face, linestyle="none", label=label)
    ax.legend(fontsize=7, loc="best")
    ax.xaxis.set_major_formatter("{x:g}")
    ax.xaxis.set_minor_formatter("{x:g}")
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_title("tokens the baseline needs for each arm's loss, over the arm's budget", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.set_ylim(-0.7, len(arms) - 0.3)
    fig.tight_layout()
    fig.savefig(root / "speedup.png", dpi=100)
    plt.close(fig)
