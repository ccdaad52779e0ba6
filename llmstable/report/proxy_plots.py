"""The proxy study's four plots (llmstable.report.proxies), in the style of Wortsman et al. 2023 (arXiv 2309.14322):
final loss against LR per size and arm (their Figure 1, top), LR sensitivity against size (Figure 1, bottom), and
the attention-logit maximum and the output log Z over steps at the highest LRs, with and without their cures."""

from __future__ import annotations

from pathlib import Path

PLOTS = (("proxy_loss_vs_lr.png", "final validation loss against LR, per size and arm (x: diverged)"),
         ("proxy_lr_sensitivity.png", "LR sensitivity against model size, per arm"),
         ("proxy_attn_logits.png", "largest attention logit over steps at the highest LRs, with and without QK-norm"),
         ("proxy_log_z.png", "output log Z over steps at the highest LRs, with and without z-loss"))

COLORS = {"baseline": "C0", "qk_norm": "C1", "zloss": "C2", "qk_norm+zloss": "C3"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def color(arm: dict, i: int) -> str:
    return COLORS.get(arm["role"], f"C{4 + i % 6}")


def plot_all(root: Path, study: dict) -> None:
    plot_loss_vs_lr(root, study)
    plot_sensitivity_vs_size(root, study)
    plot_curves(root, study, "attn_curve", ("baseline", "qk_norm"), "proxy_attn_logits.png",
                "largest attention logit (log)", log=True)
    plot_curves(root, study, "log_z_curve", ("baseline", "zloss"), "proxy_log_z.png", "output log Z (mean over tokens)")


def plot_loss_vs_lr(root: Path, study: dict) -> None:
    plt = _pyplot()
    sizes = study["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4), squeeze=False, sharey=True)
    finite = [v for s in sizes for a in s["arms"] for v in a["loss_by_lr"].values() if v is not None]
    top = max(finite) + 0.2 if finite else 10.0
    for ax, size in zip(axes[0], sizes):
        for i, arm in enumerate(size["arms"]):
            ok = [(lr, v) for lr, v in arm["loss_by_lr"].items() if v is not None]
            bad = [lr for lr, v in arm["loss_by_lr"].items() if v is None]
            style = "o-" if arm["role"] else "s--"
            if ok:
                ax.plot(*zip(*ok), style, color=color(arm, i), label=arm["arm"], markersize=4)
            if bad:
                ax.plot(bad, [top] * len(bad), "x", color=color(arm, i), markersize=8,
                        label=None if ok else arm["arm"])
        ax.set_xscale("log")
        ax.set_title(f"{size['model']} ({fmt_params(size)})", fontsize=9)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("final validation loss")
    axes[0][-1].legend(fontsize=7)
    save(plt, fig, root / "proxy_loss_vs_lr.png")


def plot_sensitivity_vs_size(root: Path, study: dict) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [a["arm"] for a in study["sizes"][0]["arms"] if a["role"]] if study["sizes"] else []
    for i, name in enumerate(names):
        points = [(s["non_embedding_params"], a["lr_sensitivity"]) for s in study["sizes"] for a in s["arms"]
                  if a["arm"] == name and a["lr_sensitivity"] is not None and s["non_embedding_params"]]
        arm = next(a for a in study["sizes"][0]["arms"] if a["arm"] == name)
        if points:
            ax.plot(*zip(*points), "o-", color=color(arm, i), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("parameters without the embeddings and head")
    ax.set_ylabel("LR sensitivity (nats)")
    ax.set_title("LR sensitivity: mean over the LR grid of min(loss, initial loss) - best loss", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # (a study without the roles plotted has nothing to label)
        ax.legend(fontsize=8)
    save(plt, fig, root / "proxy_lr_sensitivity.png")


def plot_curves(root: Path, study: dict, key: str, roles: tuple[str, str], name: str, ylabel: str,
                log: bool = False) -> None:
    """One panel per size: the curve `key` of the runs of `roles` at the highest LRs (solid: the highest)."""
    plt = _pyplot()
    sizes = study["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for i, lr in enumerate(sorted(size["top_lrs"], reverse=True)):
            for r in size["rows"]:
                if r["lr"] == lr and r["role"] in roles and r[key]:
                    ax.plot(*zip(*r[key]), color=COLORS[r["role"]], linestyle="-" if i == 0 else "--",
                            label=f"{r['arm']} lr={lr:g}")
        if log:
            ax.set_yscale("log")
        else:
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(f"{size['model']} ({fmt_params(size)})", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    save(plt, fig, root / name)


def fmt_params(size: dict) -> str:
    n = size.get("non_embedding_params")
    return f"{n / 1e6:.2f}M non-embedding" if n else "?"


def save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
