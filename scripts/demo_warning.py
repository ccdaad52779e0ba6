"""`make demo-warning`: Adam spiking by itself (nothing injected), and the preconditioner early warning of Bai et
al. 2025 (arXiv 2506.04805) rising before it. Writes runs/demo_warning/warning.png and prints, for every spike, how
many steps earlier each indicator had crossed.

    python scripts/demo_warning.py [--out runs/demo_warning] [--steps 3000] [--lm]

The default is the paper's own small setting, a fully connected network trained full-batch with Adam on a
regression task (here 200 points, 10 inputs, two tanh layers of 64, lr 1e-3, betas (0.9, 0.999), eps 1e-8): once
the loss is low, g^2 << v, v decays at the rate beta2, and the loss spikes by orders of magnitude, again and
again. The indicators are llmstable's own (`llmstable.stabilizers.warning`): the stale share (g^2 < 0.01 v_hat)
and the gradient-directional curvature of the preconditioned Hessian against 2/eta, every 10 steps.

`--lm` instead trains the tiny LLaMA through `llmstable train` with the warning on (`experiment=demo_warning`),
the setting the README reports: at CPU scale it did not spike by itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import llmstable  # noqa: F401  (offline defaults)
from llmstable.stabilizers.warning import adam_preconditioner, adam_v_hat, directional_curvature, stale_counts


def train_mlp(steps: int, curvature_every: int = 10, seed: int = 0) -> dict[str, list]:
    """Full-batch Adam on a small regression network; per step the loss and the stale share, every
    `curvature_every` steps the predictor's ratio lambda * eta / 2."""
    torch.manual_seed(seed)
    x = torch.randn(200, 10)
    y = torch.sin(x @ torch.randn(10, 1))
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 1))
    lr = 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    n = sum(p.numel() for p in model.parameters())
    out = {"loss": [], "stale": [], "ratio": []}
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        if step > 1 and step % curvature_every == 0:
            out["ratio"].append((step, float(directional_curvature(loss, *adam_preconditioner(opt))) * lr / 2))
        loss.backward()
        if step > 1:  # v_hat before this step's update, as the warning reads it
            stale = sum(int(stale_counts(p.grad, adam_v_hat(opt, p), 0.01)) for p in model.parameters())
            out["stale"].append((step, stale / n))
        opt.step()
        out["loss"].append((step, loss.item()))
    return out


def spike_onsets(loss: list[tuple[int, float]], factor: float = 10.0, window: int = 50,
                 refractory: int = 30) -> list[int]:
    """Steps where the loss first exceeds `factor` times its minimum over the previous `window` steps; one per
    spike (the next onset comes at least `refractory` steps later)."""
    onsets: list[int] = []
    values = [v for _, v in loss]
    for i in range(window, len(values)):
        if values[i] > factor * min(values[i - window: i]) and (not onsets or loss[i][0] - onsets[-1] >= refractory):
            onsets.append(loss[i][0])
    return onsets


def lead_times(onsets: list[int], series: list[tuple[int, float]], threshold: float, horizon: int = 200) -> list:
    """For each spike, how many steps before it the series last crossed above `threshold` (within `horizon`
    steps; None if it did not)."""
    out = []
    for onset in onsets:
        before = [(s, v) for s, v in series if onset - horizon <= s < onset]
        first = None
        for (s, v), prev in zip(before, [None, *before[:-1]]):
            if v > threshold and (prev is None or prev[1] <= threshold):
                first = s
        out.append(None if first is None else onset - first)
    return out


def plot(out: dict, onsets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    axes[0].semilogy(*zip(*out["loss"]), linewidth=0.8)
    axes[0].set_ylabel("loss (log)")
    axes[1].plot(*zip(*out["stale"]), linewidth=0.6, color="tab:green")
    axes[1].axhline(0.5, color="purple", linestyle=":", linewidth=1)
    axes[1].set_ylabel("share with g² < 0.01·v̂")
    axes[2].semilogy(*zip(*[(s, max(r, 1e-3)) for s, r in out["ratio"]]), linewidth=0.8, color="tab:orange")
    axes[2].axhline(1.0, color="purple", linestyle=":", linewidth=1)
    axes[2].set_ylabel("λ_grad · η / 2")
    axes[2].set_xlabel("step")
    for ax in axes:
        for s in onsets:
            ax.axvline(s, color="red", linestyle="--", linewidth=0.7, alpha=0.6)
        ax.grid(alpha=0.3)
    axes[0].set_title("Adam spiking by itself (full-batch FCN); red: spike onsets, purple: warning thresholds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo_warning")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lm", action="store_true", help="the tiny LLaMA through llmstable train instead")
    ns, rest = parser.parse_known_args(argv)
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ns.lm:
        from llmstable.compose import compose_config
        from llmstable.trainer import train

        train(compose_config(["experiment=demo_warning", *rest], run_dir=out_dir / "lm"))
        print(f"run in {out_dir / 'lm'}; `llmstable spikes {out_dir / 'lm'}` lists its warnings and spikes")
        return 0
    result = train_mlp(ns.steps)
    onsets = spike_onsets(result["loss"])
    stale_lead = lead_times(onsets, result["stale"], 0.5)
    first = {name: next((s for s, v in result[key] if v > limit), None)
             for name, key, limit in (("stale share > 0.5", "stale", 0.5), ("lambda_grad > 2/eta", "ratio", 1.0))}
    late = [r for s, r in result["ratio"] if s > ns.steps // 2]
    plot(result, onsets, out_dir / "warning.png")
    print(f"{len(onsets)} spikes (loss > 10x its minimum over the previous 50 steps), the first at step "
          f"{onsets[0] if onsets else None}: {onsets}")
    print(f"first crossings: {first}")
    leads = [x for x in stale_lead if x is not None]
    median = sorted(leads)[len(leads) // 2] if leads else None
    print(f"stale share > 0.5 crossed before {len(leads)} of {len(onsets)} spikes, median {median} steps before")
    print(f"lambda_grad * eta / 2 in the second half: median {sorted(late)[len(late) // 2]:.1f} (Adam with momentum "
          f"settles at (1 + beta1) / (1 - beta1) = 19)")
    print(f"plot: {out_dir / 'warning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
