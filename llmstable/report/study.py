"""The study's per-arm answers from the run rows (llmstable.report.runs): each arm's best LR, chosen on the selection
seeds; its loss on the judged seeds (fresh ones, `compare.confirm_seeds`, when the study has them, else the same
runs); its paired difference against the baseline with the raw 95% interval, Bonferroni's interval and Holm's
adjusted p-value over the study's arms; its speedup as tokens saved (llmstable.speedup); its stability and cost.
Every number is a run file's number, or a mean, difference, interval or fit of them."""

from __future__ import annotations

import statistics

from llmstable.speedup import INTERVAL_METHOD, fits, speedup
from llmstable.statistics import (
    best_lr, grid_edge, holm, lr_sensitivity, next_lr, paired_difference, verdict,
)

ALPHA = 0.05  # the family-wise error rate of the verdicts over the study's arms


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
    """The full-budget runs of a study arm at its best LR (and, for a tuned arm, at its chosen value): one per
    seed, selection and judged seeds alike."""
    value = (arm.get("tuned") or {}).get("value")
    return [r for r in rows if r["arm"] == arm["arm"] and r["lr"] == arm["best_lr"] and not r["budget_run"]
            and r.get("tuned_value") == value]


def baseline_curve(rows: list[dict], baseline: str, lr: float | None, tuned_value, seeds: set) -> dict:
    """The baseline's final loss at each budget it ran at its best LR (and chosen tuned value), on the judged seeds:
    budgets ascending, each seed's losses (the seeds that finished every budget), their means and spreads, and how
    the runs were made (steps, LR warm-up, the optimizer's own step counts)."""
    runs: dict[int, list[dict]] = {}
    for r in rows:
        if r["arm"] == baseline and r["lr"] == lr and r.get("tuned_value") == tuned_value and r["seed"] in seeds:
            runs.setdefault(r["planned_tokens"], []).append(r)
    budgets = sorted(runs)
    complete = [s for s in sorted(seeds) if all(
        any(r["seed"] == s and not r["diverged"] for r in runs[d]) for d in budgets)]
    per_seed = {s: [next(r["final_val_loss"] for r in runs[d] if r["seed"] == s) for d in budgets] for s in complete}
    means = [statistics.fmean(per_seed[s][i] for s in complete) for i in range(len(budgets))] if complete else []
    made = [{"tokens": d, **{k: runs[d][0].get(k) for k in ("total_steps", "warmup_steps", "schedule",
                                                            "optimizer_step_counts")},
             "seeds": sorted(r["seed"] for r in runs[d]),
             "diverged": sorted(r["seed"] for r in runs[d] if r["diverged"])} for d in budgets]
    return {"budgets": budgets, "seeds": complete, "per_seed": {str(s): v for s, v in per_seed.items()},
            "mean": means, "std": [statistics.stdev(per_seed[s][i] for s in complete) if len(complete) > 1 else None
                                   for i in range(len(budgets))],
            "runs": made, "families": fits(budgets, means) if means else {}}


def analyse(rows: list[dict], baseline: str, confirm_seeds=()) -> dict:
    """The study: {"baseline", "budget_tokens", "selection_seeds", "judged_seeds", "clean_choice", "curve",
    "self_check", "arms": [one dict per arm], ...}. Each arm's LR (and tuned value) is chosen on the runs of the
    seeds not in `confirm_seeds`; with confirm seeds, every judgement (difference, verdict, speedup) is made on
    theirs alone. The baseline is the first arm when the named one did not run."""
    confirm = set(confirm_seeds)
    grid_rows = [r for r in rows if not r["budget_run"] and r["seed"] not in confirm]
    arms = list(dict.fromkeys(r["arm"] for r in grid_rows))
    if baseline not in arms:
        baseline = arms[0]
    arms = [baseline, *(a for a in arms if a != baseline)]  # the baseline's row first
    budget = max(r["planned_tokens"] for r in grid_rows)
    selection = sorted({r["seed"] for r in grid_rows})
    judged_seeds = set(confirm) or set(selection)
    per_arm, tuning, cores, judged = {}, {}, {}, {}
    for arm in arms:
        per_arm[arm], tuning[arm] = pick_tuned([r for r in grid_rows if r["arm"] == arm])
        cores[arm] = arm_core(per_arm[arm])
        value = (tuning[arm] or {}).get("value")
        judged[arm] = [r for r in rows if r["arm"] == arm and not r["budget_run"] and r["seed"] in judged_seeds
                       and r["lr"] == cores[arm]["best_lr"] and r.get("tuned_value") == value]
    base_losses = finite_losses(judged[baseline])
    diffs = {arm: paired_difference(finite_losses(judged[arm]), base_losses) for arm in arms[1:]}
    tested = {arm: d.p_value for arm, d in diffs.items() if d is not None and d.p_value is not None}
    adjusted = holm(tested)
    curve = baseline_curve(rows, baseline, cores[baseline]["best_lr"], (tuning[baseline] or {}).get("value"),
                           judged_seeds)
    per_seed = {int(s): v for s, v in curve["per_seed"].items()}
    entries = []
    for arm in arms:
        core, runs = cores[arm], judged[arm]
        losses, diff = finite_losses(runs), diffs.get(arm)
        entries.append({
            "arm": arm, **{k: v for k, v in core.items() if k not in ("losses", "final_val_loss",
                                                                       "final_val_loss_std")},
            "tuned": tuning[arm], "selection_final_val_loss": core["final_val_loss"],
            "judged_seeds": sorted(r["seed"] for r in runs),
            "diverged_seeds": sorted(r["seed"] for r in runs if r["diverged"]),
            "final_val_loss": mean(list(losses.values())),
            "final_val_loss_std": statistics.stdev(losses.values()) if len(losses) > 1 else None,
            "per_seed_final_val_loss": {str(s): v for s, v in sorted(losses.items())},
            "paired_diff": paired_entry(diff, adjusted.get(arm), len(tested)),
            "verdict": arm_verdict(arm, baseline, runs, diff, adjusted.get(arm)),
            "speedup": speedup(curve["budgets"], per_seed, losses, budget) if not any(r["diverged"] for r in runs)
            else {"method": "unavailable", "value": None, "interval": None, "families": {}, "seeds": [],
                  "reason": "a judged run diverged"},
            **stability(per_arm[arm], runs, core),
            **cost(runs, judged[baseline]),
        })
    return {"baseline": baseline, "budget_tokens": budget, "selection_seeds": selection,
            "judged_seeds": sorted(judged_seeds), "clean_choice": bool(confirm), "alpha": ALPHA,
            "compared_arms": len(tested), "speedup_interval_method": INTERVAL_METHOD, "curve": curve,
            "self_check": [{"tokens": d, "speedup": speedup(curve["budgets"], per_seed,
                                                           {s: v[i] for s, v in per_seed.items()}, d)["value"]}
                           for i, d in enumerate(curve["budgets"])],
            "arms": entries}


def finite_losses(runs: list[dict]) -> dict[int, float]:
    return {r["seed"]: r["final_val_loss"] for r in runs if not r["diverged"]}


def paired_entry(diff, p_holm: float | None, m: int) -> dict | None:
    """The paired difference for report.json: mean, std, raw 95% interval, Bonferroni's interval over the m arms
    compared (1 - 0.05/m), the raw and Holm-adjusted p-values."""
    if diff is None:
        return None
    return {"n": diff.n, "mean": diff.mean, "std": diff.std, "ci95": list(diff.ci95) if diff.ci95 else None,
            "ci_bonferroni": list(diff.interval(1 - ALPHA / m)) if diff.std is not None and m else None,
            "p_value": diff.p_value, "p_holm": p_holm, "correction": f"Holm over {m} arm{'s' if m != 1 else ''}"}


def arm_verdict(arm: str, baseline: str, runs: list[dict], diff, p_holm: float | None) -> str:
    if arm == baseline:
        return "baseline"
    if not runs:
        return "no judged run"
    bad = sorted(r["seed"] for r in runs if r["diverged"])
    if bad:
        return f"diverged at its chosen LR on seed {', '.join(map(str, bad))}"
    return verdict(diff, p_holm, ALPHA)


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


def stability(rows: list[dict], judged: list[dict], core: dict) -> dict:
    """The share of the LR grid where no seed diverged; spikes, rollbacks and skipped samples at the best LR (mean
    over the judged seeds); Wortsman's LR sensitivity over the grid, capped at the loss of the initial weights (the
    same for every arm of a seed: one init, one first batch)."""
    groups = by_lr(rows)
    stable = sum(not any(r["diverged"] for r in runs) for runs in groups.values())
    initial = mean([r.get("initial_loss") for r in rows])
    losses_by_lr = {float(k): v for k, v in core["mean_final_val_loss_by_lr"].items()}
    return {
        "stable_lrs": stable, "grid_lrs": len(groups), "stable_share": stable / len(groups),
        "spikes": mean([r["spikes"] for r in judged]), "rollbacks": mean([r["rollbacks"] for r in judged]),
        "skipped_samples": mean([r["skipped_samples"] for r in judged]),
        "initial_loss": initial, "lr_sensitivity": lr_sensitivity(losses_by_lr, initial),
    }


def cost(best: list[dict], base: list[dict]) -> dict:
    """Throughput and peak memory at the best LR relative to the baseline's at its best LR (means over the judged
    seeds; runs sharing a machine move these), and the optimizer state in bytes per parameter."""

    def ratio(key):
        arm, ref = mean([r[key] for r in best]), mean([r[key] for r in base])
        return arm / ref if arm is not None and ref else None

    return {"tokens_per_sec": mean([r["tokens_per_sec"] for r in best]), "tokens_per_sec_rel": ratio("tokens_per_sec"),
            "peak_memory_mb": mean([r["peak_memory_mb"] for r in best]), "peak_memory_rel": ratio("peak_memory_mb"),
            "optimizer_state_bytes_per_param": mean([r["optimizer_state_bytes_per_param"] for r in best])}
