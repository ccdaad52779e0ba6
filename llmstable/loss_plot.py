"""Loss plots for a run directory, drawn from metrics.jsonl and events.jsonl."""

from __future__ import annotations

from pathlib import Path

from llmstable.records import read_events, read_metrics


def final_curve(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(tokens, value) of the last row logged for each step: steps replayed after a rollback or a resume replace
    the ones they undid."""
    by_step = {r["step"]: (r["tokens"], r[key]) for r in rows if isinstance(r.get(key), float)}
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(run_dir: Path, out: Path | None = None) -> Path:
    """Train and validation loss against tokens, with spikes (and the block each came from), rollbacks and skipped
    data marked ->
    RUN_DIR/loss.png (or `out`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    events = read_events(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
    train, val = final_curve(rows, "train/loss"), final_curve(rows, "val/loss")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    if train:  # keep the axis on the healthy curve; spikes are marked, not plotted
        values = sorted(v for _, v in train)
        ax.set_ylim(values[0] - 0.2, values[int(0.98 * (len(values) - 1))] + 0.5)
    marks = {"spike": None, "rollback": None, "skip_step": None}
    for e in events:
        if "tokens" not in e:
            continue
        if e["event"] == "spike":
            marks["spike"] = ax.axvline(e["tokens"], color="red", linestyle="--", linewidth=0.8, alpha=0.7)
            if e.get("layer") is not None:  # the block that moved first (llmstable.stabilizers.localize)
                ax.annotate(f"L{e['layer']}", (e["tokens"], 0.02), xycoords=("data", "axes fraction"), ha="left",
                            fontsize=7, color="red")
        elif e["event"] == "rollback" and "to_tokens" in e:
            marks["rollback"] = ax.axvspan(e["to_tokens"], e["tokens"], color="orange", alpha=0.2)
        elif e["event"] == "skip_step":
            marks["skip_step"] = ax.axvline(e["tokens"], color="grey", linestyle=":", linewidth=1)
        if e["event"] == "skip_data":
            ax.annotate(f"skip {e['end'] - e['start']} samples", (e["tokens"], 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=7, color="darkred")
    labels = {"spike": "spike", "rollback": "rolled back (then data skipped)", "skip_step": "update skipped"}
    for key, handle in marks.items():
        if handle is not None:
            handle.set_label(labels[key])
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
