"""report.md: the per-arm study table, the grid warnings, what the study can and cannot conclude, then every
(arm, LR) setting and the fairness checks. The HTML report (llmstable.report.page) renders the same cells."""

from __future__ import annotations

from llmstable.report.runs import tuned_label
from llmstable.spikes import COLUMNS, cell

PLOTS = (("lr_sensitivity.png", "final validation loss against LR per arm (x: diverged, ring: best LR)"),
         ("loss_curves.png", "each arm's best run (dashed: spikes, labelled with their block; dotted: rollbacks)"),
         ("speedup.png", "speedup over the baseline as tokens saved, with the range over seeds"))


def fmt(value, std=None, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) >= 1e4:
        text = f"{value:,.0f}"
    else:
        text = f"{value:.{digits}g}" if isinstance(value, float) else str(value)
    return text + (f" ± {std:.2g}" if std is not None else "")


ARM_HEAD = ["arm", "best LR", "final val loss", "Δ vs baseline [95% CI]", "verdict", "speedup D_eff/D",
            "stable LRs", "spikes / rollbacks / skipped samples", "LR sensitivity", "tok/s ×", "peak mem ×",
            "state B/param"]


def arm_cells(a: dict) -> list[str]:
    """One row of the study table (shared by report.md and report.html)."""
    edge = {"low": " (low edge!)", "high": " (high edge!)", "single": " (one LR: untuned)"}.get(a["grid_edge"], "")
    d = a["paired_diff"]
    if d is None:
        diff = "-"
    else:
        ci = f" [{d['ci95'][0]:+.3g}, {d['ci95'][1]:+.3g}]" if d["ci95"] else " [one seed: no interval]"
        diff = f"{d['mean']:+.3g}{ci}"
    if a["speedup"] is None:
        speed = f"unavailable: {a['speedup_reason']}"
    else:
        interval = a["speedup_interval"]
        speed = f"{a['speedup']:.3g}" + (f" ({interval[0]:.3g} to {interval[1]:.3g})" if interval else "")
        speed += f", {a['speedup_status']}" + (f": {a['speedup_reason']}" if a["speedup_reason"] else "")
    tuned = a.get("tuned")
    if tuned:
        tuned_edge = {"low": " (low edge!)", "high": " (high edge!)"}.get(tuned["edge"], "")
        edge += f"; {tuned['key'].rsplit('.', 1)[-1]}={tuned['value']}{tuned_edge}"
    return [a["arm"], fmt(a["best_lr"]) + edge, fmt(a["final_val_loss"], a["final_val_loss_std"]), diff,
            a["verdict"], speed, f"{a['stable_lrs']}/{a['grid_lrs']}",
            f"{fmt(a['spikes'])} / {fmt(a['rollbacks'])} / {fmt(a['skipped_samples'])}",
            fmt(a["lr_sensitivity"], digits=3),
            fmt(a["tokens_per_sec_rel"], digits=3), fmt(a["peak_memory_rel"], digits=3),
            fmt(a["optimizer_state_bytes_per_param"], digits=3)]


def grid_warnings(study: dict) -> list[str]:
    out = []
    for a in study["arms"]:
        if a["best_lr"] is None:
            out.append(f"{a['arm']}: every LR of its grid diverged; nothing to compare")
        elif a["grid_edge"] in ("low", "high"):
            out.append(f"{a['arm']}: the best LR {a['best_lr']:g} is the {a['grid_edge']} edge of its grid "
                       f"{[float(f'{x:g}') for x in a['grid']]}: the optimum may lie beyond it. Rerun with "
                       f"compare.extend_grid=true to add {', '.join(f'{x:g}' for x in a['extend_with'])}")
        tuned = a.get("tuned")
        if tuned and tuned["edge"] in ("low", "high"):
            out.append(f"{a['arm']}: its best {tuned['key']}={tuned['value']} is the {tuned['edge']} edge of the "
                       f"values tried {tuned['values']}: add values beyond it to `tune` in configs/arm/{a['arm']}.yaml")
        if a["grid_edge"] == "single":
            out.append(f"{a['arm']}: a grid of one LR ({a['best_lr']:g}) tunes nothing; compare.extend_grid=true adds "
                       f"{', '.join(f'{x:g}' for x in a['extend_with'])}")
    return out


def conclusions(study: dict, rows: list[dict]) -> str:
    """What the study can and cannot conclude: its scale, its seeds, its grid edges, its fit."""
    arms = study["arms"]
    seeds = max(len(a["seeds"]) for a in arms)
    params = next((r["num_params"] for r in rows if r.get("num_params")), None)
    edges = [a["arm"] for a in arms if a["grid_edge"]]
    decided = [f"{a['arm']} {a['verdict']}" for a in arms if a["verdict"] in ("better", "worse")]
    extrapolated = [a["arm"] for a in arms if a["speedup_status"] == "extrapolated"]
    text = (f"This study trained {len(rows)} runs of a {fmt(float(params)) if params else '?'}-parameter model on "
            f"{fmt(float(study['budget_tokens']))} tokens per grid run, {len(arms)} arms, {seeds} seed(s) per setting, "
            f"each arm at the best LR of its own grid. It can say which arm reached the lower validation loss at this "
            f"scale and budget, and by how much, paired by seed: ")
    text += (", ".join(decided) + " than the baseline at 95% confidence. " if decided else
             "no arm is distinguishable from the baseline at 95% confidence. ")
    text += (f"It cannot say how the ranking holds at larger models or budgets (the literature finds speedups shrink "
             f"with scale); with {seeds} seed(s) the t interval is wide "
             f"({'t = 12.7 at 2 seeds' if seeds == 2 else 'no interval at 1 seed' if seeds == 1 else 'few seeds'}), "
             f"so only large differences are resolved. ")
    if edges:
        text += f"The best LR sits on the grid's edge for {', '.join(edges)}: those arms may be under-tuned. "
    if extrapolated:
        text += f"The speedups of {', '.join(extrapolated)} are extrapolated beyond the baseline budgets the fit saw. "
    text += ("Throughput and memory were measured with runs sharing the machine's cores, so their ratios are "
             "indicative only.")
    return text


def markdown(study: dict, ranked: list[dict], rows: list[dict], fair: dict, target: float | None) -> str:
    lines = ["# Comparison report", "", f"Baseline: **{study['baseline']}**. Each arm at the best LR of its grid "
             "(mean final validation loss over seeds); Δ is the mean paired difference against the baseline over "
             "seeds (negative is better); speedup is D_eff / D from the baseline's fit L(D) = a·D^(-B) + b.", ""]
    lines += ["| " + " | ".join(ARM_HEAD) + " |", "|" + " --- |" * len(ARM_HEAD)]
    lines += ["| " + " | ".join(arm_cells(a)) + " |" for a in study["arms"]]
    lines += ["", "## What this can and cannot conclude", "", conclusions(study, rows), ""]
    warnings = grid_warnings(study)
    if warnings:
        lines += ["## Grid edges", ""] + [f"- **{w}**" for w in warnings] + [""]
    fit = study["fit"]
    lines += ["## Baseline fit", ""]
    if "a" in fit:
        lines.append(f"L(D) = {fit['a']:.4g}·D^(-{fit['B']:.4g}) + {fit['b']:.4g}, R² = {fit['r2']:.4f}, on "
                     f"{study['baseline']}'s mean final loss at {', '.join(fit['points'])} tokens.")
    else:
        lines.append(f"No fit: {fit['reason']}.")
    lines += ["", *settings_table(ranked, rows, target), "", *spike_lines(rows), "", "## Same start", ""]
    for seed, checks in fair["same_start_by_seed"].items():
        lines.append(f"- seed {seed}: identical initial weights: {'yes' if checks['initial_weights'] else 'NO'}; "
                     f"identical first batch: {'yes' if checks['first_batch'] else 'NO'}")
    lines += ["", "## What differs between runs", "", ", ".join(f"`{k}`" for k in fair["differs"]) or "nothing",
              "", "## Settings every run shares", ""]
    lines += [f"- `{k}`: {v}" for k, v in fair["shared"].items()]
    lines += [""] + [f"![{title}]({name})" for name, title in PLOTS]
    return "\n".join(lines) + "\n"


SETTINGS_HEAD = ["rank", "arm", "lr", "seeds", "final val loss", "best val loss", "final ppl", "tokens to target",
                 "spikes", "rollbacks", "skipped steps", "tokens/s", "peak MB", "wall s", "diverged"]


SPIKES_HEAD = ["run", *COLUMNS]
MAX_SPIKE_ROWS = 100  # beyond these, the section points to `llmstable spikes RUN_DIR`


def spike_cells(rows: list[dict]) -> tuple[list[list[str]], int]:
    """The Spikes table's rows (every run's spikes, early warnings and SDC suspects, with the block each came from),
    at most MAX_SPIKE_ROWS, and how many were left out."""
    cells = [[r["run"], *(cell(e[c]) for c in COLUMNS)] for r in rows for e in r.get("spike_events", [])]
    return cells[:MAX_SPIKE_ROWS], max(len(cells) - MAX_SPIKE_ROWS, 0)


SPIKES_NOTE = ("Every spike detection, early warning and SDC suspect, with the block it came from (the first to move "
               "against its own history) and the samples skipped.")


def spike_lines(rows: list[dict]) -> list[str]:
    cells, left_out = spike_cells(rows)
    if not cells:
        return ["## Spikes", "", "No run detected a spike."]
    lines = ["## Spikes", "", SPIKES_NOTE, "", "| " + " | ".join(SPIKES_HEAD) + " |", "|" + " --- |" * len(SPIKES_HEAD)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    if left_out:
        lines += ["", f"{left_out} more: `llmstable spikes RUN_DIR` lists a run's own."]
    return lines


def setting_cells(i: int, e: dict, rows: list[dict]) -> list[str]:
    diverged = "-"
    if e["diverged"]:
        steps = [r["diverged_step"] for r in rows if r["arm"] == e["arm"] and r["lr"] == e["lr"] and r["diverged"]
                 and not r["budget_run"] and r["tuned_value"] == e["tuned_value"]]
        diverged = f"{e['diverged']}/{e['seeds']} (step {', '.join(map(str, steps))})"
    return [str(i), tuned_label(e), fmt(e["lr"]), str(e["seeds"]),
            fmt(e["final_val_loss"], e["final_val_loss_std"]), fmt(e["best_val_loss"], e["best_val_loss_std"]),
            fmt(e["final_val_ppl"], e["final_val_ppl_std"]), fmt(e["tokens_to_target"]),
            fmt(e["spikes"]), fmt(e["rollbacks"]), fmt(e["skipped_steps"]),
            fmt(e["tokens_per_sec"], digits=5), fmt(e["peak_memory_mb"], digits=5), fmt(e["wall_s"], digits=4),
            diverged]


def settings_table(ranked: list[dict], rows: list[dict], target: float | None) -> list[str]:
    head = [h if h != "tokens to target" or target is None else f"tokens to {target}" for h in SETTINGS_HEAD]
    lines = ["## Every setting", "", f"{len(ranked)} arm x LR settings (x the tuned value, for an arm with `tune`) "
             "at the full budget, ranked by final validation loss (mean ± std across seeds).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(setting_cells(i, e, rows)) + " |" for i, e in enumerate(ranked, 1)]
    return lines
