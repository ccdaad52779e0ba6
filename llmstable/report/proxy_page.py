"""The proxy study's report across sizes (llmstable.report.proxies): report.md, report.json, a self-contained
report.html (its LR-sensitivity table has id "arms", one row per arm) and four plots, in the sweep directory; each
size's own comparison report stays in its subdirectory (llmstable.report.write_report)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from llmstable.report.page import STYLE, inline_png, table
from llmstable.report.proxies import NOISE, TOP_LRS, analyse_sizes
from llmstable.report.proxy_plots import PLOTS, plot_all

TITLE = "Small-scale proxies for training instabilities"
PAPER = ("Wortsman et al. 2023, \"Small-scale proxies for large-scale Transformer training instabilities\", "
         "arXiv 2309.14322")
CLAIM_HEAD = ["claim", "source", "rule (fixed before the runs)", "measured", "verdict"]
STABILITY_HEAD = ["size", "arm", "LR", "final val loss", "diverged", "spikes", "rollbacks", "skipped samples"]


def write_proxy_report(root: Path, models: list[str]) -> Path:
    """The study's report across sizes (each size's own is written first, by `llmstable.report.write_report`);
    returns the path of report.md."""
    root = Path(root)
    study = analyse_sizes(root, models)
    (root / "report.json").write_text(json.dumps(strip_curves(study), indent=2, default=str))
    plot_all(root, study)
    (root / "report.html").write_text(html(root, study), encoding="utf-8")
    path = root / "report.md"
    path.write_text(markdown(study), encoding="utf-8")
    return path


def strip_curves(study: dict) -> dict:
    """report.json: the study without the per-run rows (each size's own report.json has them)."""
    return {**study, "sizes": [{k: v for k, v in s.items() if k != "rows"} for s in study["sizes"]]}


def num(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def size_label(size: dict) -> str:
    n, total = size.get("non_embedding_params"), size.get("num_params")
    return f"{size['model']} ({n / 1e6:.2f}M, {total / 1e6:.2f}M with embeddings)" if n and total else size["model"]


def intro(study: dict) -> str:
    setup, sizes = study["setup"], study["sizes"]
    settings = ", ".join(f"{k}={v}" for k, v in setup.get("settings", {}).items())
    return (f"A reproduction of {PAPER} on CPU: {setup.get('runs', 0)} runs at {len(sizes)} sizes "
            f"({', '.join(size_label(s) for s in sizes)}; parameters without the input embedding and the LM head, "
            f"the paper's count), each arm over its LR grid, seed(s) {setup.get('seeds')}. Shared settings: "
            f"{settings}. LR sensitivity is the paper's (section 2.2): the mean over the LR grid of "
            "min(final loss, loss at initialisation) minus the best final loss of the grid, a diverged LR counting "
            "at the loss at initialisation.")


def conclusions(study: dict) -> str:
    seeds = len(study["setup"].get("seeds") or [])
    return (f"With {seeds} seed(s) there is no interval on any number here: a difference of LR sensitivity under "
            f"{NOISE:g} nats is called not resolved (the seed-to-seed spread of the final loss in `make compare` "
            "reached 0.045). The best loss of each grid is picked from the same runs it is judged on, as the "
            "definition of LR sensitivity does. The models are orders of magnitude smaller and the runs orders of "
            "magnitude shorter than the paper's, so a claim that does not reproduce here says what happens at this "
            "scale, not that the paper is wrong; one that reproduces says the proxy shows it on a laptop. Throughput "
            "and memory are not compared: runs shared the machine's cores.")


def sensitivity_table(study: dict) -> tuple[list[str], list[list[str]]]:
    """One row per arm that ran the whole grid, one column per size."""
    sizes = study["sizes"]
    names = [a["arm"] for a in sizes[0]["arms"] if a["role"]] if sizes else []
    rows = []
    for name in names:
        cells = [name]
        for size in sizes:
            arm = next((a for a in size["arms"] if a["arm"] == name), None)
            cells.append(num(arm["lr_sensitivity"], 3) if arm else "-")
        rows.append(cells)
    return ["arm", *(s["model"] for s in sizes)], rows


def loss_table(size: dict) -> tuple[list[str], list[list[str]]]:
    lrs = sorted({lr for a in size["arms"] for lr in a["grid"]})
    rows = []
    for arm in size["arms"]:
        cells = [arm["arm"]]
        for lr in lrs:
            if lr not in arm["loss_by_lr"]:
                cells.append("")
            else:
                v = arm["loss_by_lr"][lr]
                cells.append("diverged" if v is None else num(v) + (" *" if lr == arm["best_lr"] else ""))
        rows.append(cells + [num(arm["initial_loss"])])
    return ["arm", *(f"{lr:g}" for lr in lrs), "loss at init"], rows


def stability_rows(study: dict) -> list[list[str]]:
    return [[size["model"], r["arm"], f"{r['lr']:g}", num(r["final_val_loss"]),
             f"yes (step {r['diverged_step']})" if r["diverged"] else "no", str(r["spikes"]), str(r["rollbacks"]),
             str(r["skipped_samples"])] for size in study["sizes"] for r in size["stability"]]


def claim_cells(c: dict) -> list[str]:
    return [c["claim"], c["source"], c["rule"], c["measured"], c["verdict"]]


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
            *("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows)]


def markdown(study: dict) -> str:
    lines = [f"# {TITLE}", "", intro(study), "", "## Claims", ""]
    lines += md_table(CLAIM_HEAD, [claim_cells(c) for c in study["claims"]])
    lines += ["", "## LR sensitivity per arm and size", "", *md_table(*sensitivity_table(study)), "",
              "![LR sensitivity against size](proxy_lr_sensitivity.png)", "",
              "## Final loss against LR", "", "Final validation loss (`*`: the best LR of the arm's grid).", ""]
    for size in study["sizes"]:
        lines += [f"### {size_label(size)}", "", *md_table(*loss_table(size)), ""]
    lines += ["![final loss against LR](proxy_loss_vs_lr.png)", "",
              f"## The logits' indicators at the {TOP_LRS} highest LRs", "",
              "![attention logits](proxy_attn_logits.png)", "", "![log Z](proxy_log_z.png)", "",
              f"## Stability at the {TOP_LRS} highest LRs", "",
              "Every run at those LRs; spikes and rollbacks are counted by the runs with the spike guard.", "",
              *md_table(STABILITY_HEAD, stability_rows(study)), "",
              "## What this can and cannot conclude", "", conclusions(study), "",
              "## Each size's own report", "",
              *(f"- [{s['model']}]({s['model']}/report.md)" for s in study["sizes"])]
    return "\n".join(lines) + "\n"


def html(root: Path, study: dict) -> str:
    parts = ["<!DOCTYPE html>", f'<html lang="en"><head><meta charset="utf-8"><title>{TITLE}</title>',
             f"<style>{STYLE}</style></head><body>", f"<h1>{TITLE}</h1>", f"<p>{escape(intro(study))}</p>",
             "<h2>Claims</h2>", table("claims", CLAIM_HEAD, [claim_cells(c) for c in study["claims"]]),
             "<h2>LR sensitivity per arm and size</h2>", table("arms", *sensitivity_table(study)),
             "<h2>Final loss against LR</h2>"]
    for size in study["sizes"]:
        parts += [f"<h3>{escape(size_label(size))}</h3>", table(f"loss-{size['model']}", *loss_table(size))]
    for name, title in PLOTS:
        if (root / name).exists():
            parts += [f"<h2>{escape(title[0].upper() + title[1:])}</h2>",
                      f'<img alt="{escape(title)}" src="{inline_png(root / name)}">']
    parts += [f"<h2>Stability at the {TOP_LRS} highest LRs</h2>",
              table("stability", STABILITY_HEAD, stability_rows(study)),
              "<h2>What this can and cannot conclude</h2>", f"<p>{escape(conclusions(study))}</p>",
              "<h2>Each size's own report</h2><ul>",
              *(f'<li><a href="{escape(m)}/report.html">{escape(m)}</a></li>'
                for m in (size["model"] for size in study["sizes"])),
              "</ul></body></html>"]
    return "\n".join(parts) + "\n"
