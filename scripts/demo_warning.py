"""`make demo-warning`: a tiny LLaMA trained with AdamW where the loss spikes by itself (nothing injected), with
the preconditioner early warning on (arXiv 2506.04805). Writes RUN_DIR/warning.png: the training loss above, the
per-block stale share (g^2 < rho * v_hat) below, with the spike guard's warnings and spikes marked; prints when
the indicator first crossed and when the loss spiked.

    python scripts/demo_warning.py [run_dir=runs/demo_warning] [extra overrides]

The settings are `configs/experiment/demo_warning.yaml`; see the README for what was tried.
"""

from __future__ import annotations

import sys
from pathlib import Path

import llmstable  # noqa: F401  (offline defaults)
from llmstable.compose import compose_config
from llmstable.metrics import read_jsonl
from llmstable.trainer import train


def plot_warning(run_dir: Path, out: Path) -> dict:
    """warning.png from the run's metrics and events; returns the first warning and first spike steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}
    events = read_jsonl(run_dir / "events.jsonl")
    steps = sorted(rows)
    warnings = [e["step"] for e in events if e["event"] == "spike_warning"]
    spikes = [e["step"] for e in events if e["event"] == "spike"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(steps, [rows[s]["train/loss"] for s in steps], linewidth=1, label="train loss")
    top.set_ylabel("loss")
    layers = sorted({int(k.rsplit("_", 1)[1]) for r in rows.values() for k in r if "stale_frac/layer_" in k})
    for i in layers:
        key = f"stab/precond/stale_frac/layer_{i}"
        bottom.plot(steps, [rows[s].get(key, float("nan")) for s in steps], linewidth=1, label=f"block {i}")
    bottom.set_ylabel("share of coordinates with g² < ρ·v̂")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        for s in spikes:
            ax.axvline(s, color="red", linestyle="--", linewidth=0.8, alpha=0.6)
        for s in warnings:
            ax.axvline(s, color="purple", linestyle=":", linewidth=0.8, alpha=0.4)
        ax.grid(alpha=0.3)
    top.plot([], [], color="red", linestyle="--", label="spike (guard)")
    top.plot([], [], color="purple", linestyle=":", label="spike_warning")
    top.legend(fontsize=8)
    bottom.legend(fontsize=8, ncol=len(layers))
    top.set_title(f"{run_dir.name}: AdamW spiking by itself; the preconditioner indicator")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return {"first_warning": warnings[0] if warnings else None, "first_spike": spikes[0] if spikes else None,
            "warnings": len(warnings), "spikes": len(spikes)}


def main(args: list[str]) -> int:
    run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("run_dir=")), "runs/demo_warning")
    overrides = ["experiment=demo_warning", "resume=never", "run_dir_overwrite=true",
                 *[a for a in args if not a.startswith("run_dir=")]]
    if not Path(run_dir).exists():
        overrides.remove("run_dir_overwrite=true")
    train(compose_config(overrides, run_dir=run_dir))
    found = plot_warning(Path(run_dir), Path(run_dir) / "warning.png")
    print(f"warning.png written to {run_dir}: {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
