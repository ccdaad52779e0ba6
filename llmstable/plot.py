"""Loss plots for a run directory, drawn from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from llmstable.metrics import read_jsonl


def plot_losses(run_dir: Path, out: Path | None = None) -> Path:
    """Train and validation loss against tokens -> RUN_DIR/loss.png (or `out`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    train = [(r["tokens"], r["train/loss"]) for r in rows if isinstance(r.get("train/loss"), float)]
    val = [(r["tokens"], r["val/loss"]) for r in rows if isinstance(r.get("val/loss"), float)]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
