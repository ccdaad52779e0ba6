"""The study's per-arm answers from the run rows (llmstable.report.runs): each arm's best LR, its paired difference
against the baseline with a 95% interval, its speedup as tokens saved, its stability and its cost. Every number is
a run file's number, or a mean, difference or fit of them (llmstable.statistics)."""

from __future__ import annotations

import statistics
from dataclasses import asdict

from llmstable.statistics import (
    best_lr, fit_power_law, grid_edge, lr_sensitivity, next_lr, paired_difference, speedup,
)


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def by_lr(rows: list[dict]) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for r in rows:
        out.setdefault(r["lr"], []).append(r)
    return dict(sorted(out.items()))


def mean_loss_by_lr(rows: list[dict]) -> dict[float, float | None]:
    """Mean final validation loss over seeds per LR; None when any seed diverged (it cannot be the best LR)."""
    return {lr: None if any(r["diverged"] for r in runs) else mean([r["final_val_loss"] for r in runs])
            for lr, runs in by_lr(rows).items()}


def pick_tuned(rows: list[dict]) -> tuple[list[dict], dict | None]:
    """An arm tuned over one more key besides the LR (`tune` in configs/arm/) is a grid of LR x value: its rows at
    the value whose best LR gives the lowest mean final loss, and the tuning for the report (the key, the chosen
    value, whether it is on the edge of the values tried, and the best LR and loss at each value). Any other arm:
    its rows, and None."""
    key = rows[0].get("tuned_key") if rows else None
    if key is None:
        return rows, None
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get("tuned_value"), []).append(r)
    cores = {value: arm_core(group) for value, group in groups.items()}
    finite = {value: c["final_val_loss"] for value, c in cores.items() if c["final_val_loss"] is not None}
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in groups)
    values = sorted(groups) if numeric else list(groups)
    chosen = min(finite, key=finite.get) if finite else values[0]
    edge = grid_edge(values, chosen) if numeric and finite else None  # (an order only numbers have)
    return groups[chosen], {
        "key": key, "value": chosen, "values": values, "edge": edge,
        "by_value": {str(v): {"best_lr": cores[v]["best_lr"], "final_val_loss": cores[v]["final_val_loss"]}
                     for v in values},
    }


def best_runs(rows: list[dict], arm: dict) -> list[dict]:
    """The grid runs of a study arm at its best LR (and, for a tuned arm, at its chosen value): one per seed."""
    value = (arm.get("tuned") or {}).get("value")
    return [r for r in rows if r["arm"] == arm["arm"] and r["lr"] == arm["best_lr"] and not r["budget_run"]
            and r.get("tuned_value") == value]


def baseline_fit(rows: list[dict], baseline: str, lr: float | None, tuned_value=None):
    """Fit L(D) to the baseline's mean final loss at each budget it ran at its best LR (and chosen tuned value;
    grid runs are the full budget, budget runs the fractions). A budget with a diverged seed is left out."""
    budgets: dict[int, list[dict]] = {}
    for r in rows:
        if r["arm"] == baseline and r["lr"] == lr and r.get("tuned_value") == tuned_value:
            budgets.setdefault(r["planned_tokens"], []).append(r)
    points = {d: mean([r["final_val_loss"] for r in runs]) for d, runs in sorted(budgets.items())
              if not any(r["diverged"] for r in runs)}
    fit, reason = fit_power_law(list(points), list(points.values()))
    return fit, reason, points


def analyse(rows: list[dict], baseline: str) -> dict:
    """The study: {"baseline", "budget_tokens", "fit", "arms": [one dict per arm]}. The baseline is the first arm
    when the named one did not run."""
    grid_rows = [r for r in rows if not r["budget_run"]]
    arms = list(dict.fromkeys(r["arm"] for r in grid_rows))
    if baseline not in arms:
        baseline = arms[0]
    arms = [baseline, *(a for a in arms if a != baseline)]  # the baseline's row first
    budget = max(r["planned_tokens"] for r in grid_rows)
    per_arm, tuning = {}, {}
    for arm in arms:
        per_arm[arm], tuning[arm] = pick_tuned([r for r in grid_rows if r["arm"] == arm])
    base = arm_core(per_arm[baseline])
    fit, reason, points = baseline_fit(rows, baseline, base["best_lr"], (tuning[baseline] or {}).get("value"))
    entries = []
    for arm in arms:
        core = arm_core(per_arm[arm])
        best = [r for r in per_arm[arm] if r["lr"] == core["best_lr"]]
        losses = {r["seed"]: r["final_val_loss"] for r in best}
        diff = None if arm == baseline else paired_difference(losses, base["losses"])
        mean_speed = speedup(fit, reason, core["final_val_loss"], budget)
        seed_speeds = [speedup(fit, reason, v, budget).value for v in losses.values()] if best else []
        known = [v for v in seed_speeds if v is not None]
        entries.append({
            "arm": arm, **{k: v for k, v in core.items() if k != "losses"}, "tuned": tuning[arm],
            "per_seed_final_val_loss": {str(s): v for s, v in sorted(losses.items())},
            "paired_diff": None if diff is None else {
                "n": diff.n, "mean": diff.mean, "std": diff.std, "ci95": list(diff.ci95) if diff.ci95 else None},
            "verdict": "baseline" if arm == baseline else (diff.verdict if diff else "no seed in common"),
            "speedup": mean_speed.value, "speedup_status": mean_speed.status, "speedup_reason": mean_speed.reason,
            "speedup_interval": [min(known), max(known)] if len(known) == len(seed_speeds) and known else None,
            **stability(per_arm[arm], best, core),
            **cost(best, [r for r in per_arm[baseline] if r["lr"] == base["best_lr"]]),
        })
    return {"baseline": baseline, "budget_tokens": budget,
            "fit": {"points": {str(d): v for d, v in points.items()}, "reason": reason,
                    **({k: v for k, v in asdict(fit).items()} if fit else {})},
            "arms": entries}


def arm_core(rows: list[dict]) -> dict:
    """An arm's grid, its mean loss per LR, the best LR and whether it is on the grid's edge, the mean and std of
    the final loss over seeds at the best LR, and the per-seed losses there."""
    losses_by_lr = mean_loss_by_lr(rows)
    best = best_lr(losses_by_lr)
    edge = grid_edge(list(losses_by_lr), best)
    at_best = [r["final_val_loss"] for r in rows if r["lr"] == best]
    return {
        "grid": list(losses_by_lr), "mean_final_val_loss_by_lr": {str(k): v for k, v in losses_by_lr.items()},
        "seeds": sorted({r["seed"] for r in rows}), "best_lr": best, "grid_edge": edge,
        "extend_with": next_lr(list(losses_by_lr), edge) if edge else [],
        "final_val_loss": mean(at_best), "final_val_loss_std": statistics.stdev(at_best) if len(at_best) > 1 else None,
        "losses": {r["seed"]: r["final_val_loss"] for r in rows if r["lr"] == best},
    }


def stability(rows: list[dict], best: list[dict], core: dict) -> dict:
    """The share of the LR grid where no seed diverged; spikes, rollbacks and skipped samples at the best LR (mean
    over seeds); Wortsman's LR sensitivity, capped at the loss of the initial weights (the same for every arm of a
    seed: one init, one first batch)."""
    groups = by_lr(rows)
    stable = sum(not any(r["diverged"] for r in runs) for runs in groups.values())
    initial = mean([r.get("initial_loss") for r in rows])
    losses_by_lr = {float(k): v for k, v in core["mean_final_val_loss_by_lr"].items()}
    return {
        "stable_lrs": stable, "grid_lrs": len(groups), "stable_share": stable / len(groups),
        "spikes": mean([r["spikes"] for r in best]), "rollbacks": mean([r["rollbacks"] for r in best]),
        "skipped_samples": mean([r["skipped_samples"] for r in best]),
        "initial_loss": initial, "lr_sensitivity": lr_sensitivity(losses_by_lr, initial),
    }


def cost(best: list[dict], base: list[dict]) -> dict:
    """Throughput and peak memory at the best LR relative to the baseline's at its best LR (means over seeds; runs
    sharing a machine move these), and the optimizer state in bytes per parameter."""

    def ratio(key):
        arm, ref = mean([r[key] for r in best]), mean([r[key] for r in base])
        return arm / ref if arm is not None and ref else None

    return {"tokens_per_sec": mean([r["tokens_per_sec"] for r in best]), "tokens_per_sec_rel": ratio("tokens_per_sec"),
            "peak_memory_mb": mean([r["peak_memory_mb"] for r in best]), "peak_memory_rel": ratio("peak_memory_mb"),
            "optimizer_state_bytes_per_param": mean([r["optimizer_state_bytes_per_param"] for r in best])}
