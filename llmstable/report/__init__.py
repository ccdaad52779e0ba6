"""`llmstable report SWEEP_DIR`: report.md, report.json, report.html and three plots from each run's own
summary.json, metrics.jsonl, events.jsonl and config.yaml. Nothing is recomputed from the models: every number is
one of those files' numbers, or a mean, paired difference, interval or fit of them.

- `runs`: one row per run, the table of every (arm, LR) setting, the same-start checks;
- `study`: per arm, the best LR (chosen on the selection seeds), the paired difference against the baseline on
  the judged seeds with Holm's and Bonferroni's corrections, the speedup (llmstable.speedup), stability and cost;
- `markdown`, `page`, `plots`: report.md, report.html (self-contained) and the PNGs.
- `proxies`, `proxy_page`, `proxy_plots`: a study run at several model sizes (`compare.models`): each size's report
  in its subdirectory, and one across sizes that says which of Wortsman et al.'s claims reproduced.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from llmstable.report.markdown import markdown
from llmstable.report.page import html
from llmstable.report.plots import plot_best_runs, plot_lr_sensitivity, plot_speedup
from llmstable.report.proxy_page import write_proxy_report
from llmstable.report.runs import aggregate, fairness, readable_runs
from llmstable.report.study import analyse

__all__ = ["report_command", "write_report"]


def write_report(root: Path, target_loss: float | None = None, baseline: str = "adamw",
                 confirm_seeds: list[int] | tuple = ()) -> Path:
    """The report of a sweep directory; runs of `confirm_seeds` are the fresh seeds each arm is judged on (its LR
    chosen on the others)."""
    root = Path(root)
    runs, rows, skipped = readable_runs(root, target_loss)
    for warning in skipped:
        print(f"warning: {warning}", file=sys.stderr)
    if not runs:
        raise FileNotFoundError(f"{root} holds no finished runs (no */summary.json of a run): run the sweep first")
    confirm = set(confirm_seeds)
    if all(r["budget_run"] or r["seed"] in confirm for r in rows):
        raise FileNotFoundError(f"{root} holds no grid run of the selection seeds: run the sweep first")
    ranked = aggregate([r for r in rows if not r["budget_run"] and r["seed"] not in confirm])
    fair = fairness(runs, rows)
    study = analyse(rows, baseline, confirm_seeds)
    (root / "report.json").write_text(json.dumps({
        "target_loss": target_loss, "ranked": ranked, "runs": rows, "fairness": fair,
        **{k: v for k, v in study.items() if k != "arms"}, "arms": study["arms"]}, indent=2, default=str))
    plot_lr_sensitivity(root, rows, study)
    plot_best_runs(root, rows, study)
    plot_speedup(root, study)
    (root / "report.html").write_text(html(root, study, ranked, rows, fair), encoding="utf-8")
    path = root / "report.md"
    path.write_text(markdown(study, ranked, rows, fair, target_loss), encoding="utf-8")
    return path


def report_command(args: list[str]) -> int:
    from llmstable.errors import ArgumentParser

    parser = ArgumentParser(prog="llmstable report", description="Write the report of a sweep directory.")
    parser.add_argument("sweep_dir")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="validation loss for 'tokens to target' (default: the sweep file's target_loss)")
    parser.add_argument("--baseline", default=None, help="the arm others are compared with (default: the sweep "
                        "file's baseline, else adamw)")
    ns = parser.parse_args(args)
    sweep_file = Path(ns.sweep_dir) / "sweep.yaml"
    try:
        sweep = OmegaConf.load(sweep_file) if sweep_file.is_file() else {}
    except Exception as err:  # noqa: BLE001  (yaml's and OmegaConf's errors)
        print(f"warning: {sweep_file} is not readable YAML ({str(err).splitlines()[0][:120]}): using the defaults, "
              "--target-loss and --baseline", file=sys.stderr)
        sweep = {}
    if not isinstance(sweep, dict) and not OmegaConf.is_dict(sweep):
        sweep = {}
    target = ns.target_loss if ns.target_loss is not None else sweep.get("target_loss")
    baseline = ns.baseline or sweep.get("baseline") or "adamw"
    confirm = list(sweep.get("confirm_seeds") or [])  # the seeds each arm is judged on (its LR chosen on others)
    root, models = Path(ns.sweep_dir), list(sweep.get("models") or [])
    try:
        for model in models:  # a study at several sizes: each size's report, then the one across sizes
            write_report(root / model, target, baseline, confirm)
        path = write_proxy_report(root, models) if models else write_report(root, target, baseline, confirm)
        print(f"report: {path}")
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
