"""report.md: the per-arm study table, what the study can and cannot conclude, how the LRs were chosen and the
verdicts corrected, the grid warnings, the baseline's budget runs, then every (arm, LR) setting and the fairness
checks. The HTML report (llmstable.report.page) renders the same cells and text."""

from __future__ import annotations

from llmstable.report.runs import tuned_label
from llmstable.report.spikes import COLUMNS, cell

PLOTS = (("lr_sensitivity.png", "final validation loss against LR per arm, on the selection seeds (x: diverged, "
                                 "ring: best LR)"),
         ("loss_curves.png", "each arm's best run (dashed: spikes, labelled with their block; dotted: rollbacks)"),
         ("speedup.png", "speedup over the baseline as tokens saved, with its 95% interval over the paired seeds"))
FAMILY_NAMES = {"power_law": "power law a·D^-B + b (free floor)", "log_linear": "log-linear c − k·ln D"}
SHORT_NAMES = {"power_law": "power law", "log_linear": "log-linear"}


def fmt(value, std=None, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) >= 1e4:
        text = f"{value:,.0f}"
    else:
        text = f"{value:.{digits}g}" if isinstance(value, float) else str(value)
    return text + (f" ± {std:.2g}" if std is not None else "")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def seeds_text(seeds: list) -> str:
    return f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"


ARM_HEAD = ["arm", "best LR", "final val loss (judged)", "Δ vs baseline [raw 95% CI]", "Δ [Bonferroni CI]",
            "p raw / Holm", "verdict (family-wise 5%)", "speedup D_eff/D [95% CI]", "stable LRs",
            "spikes / rollbacks / skipped samples", "LR sensitivity", "tok/s ×", "peak mem ×", "state B/param"]


def interval_text(value: float | None, interval) -> str:
    return fmt(value, digits=3) + (f" [{interval[0]:.3g}, {interval[1]:.3g}]" if interval else "")


def speedup_text(a: dict) -> str:
    """The speedup cell: the value, its interval and how it was obtained; beyond the measured budgets both laws."""
    sp = a["speedup"]
    if sp["method"] == "interpolated":
        note = f"; {sp['reason']}" if sp["reason"] else ""
        return f"{interval_text(sp['value'], sp['interval'])} (from the baseline's measured points{note})"
    if sp["method"] == "extrapolated":
        parts = []
        for family, est in sp["families"].items():
            name = SHORT_NAMES[family]
            if est["value"] is None:
                parts.append(f"{name}: refused ({est['reason']})")
            else:
                parts.append(f"{name} {interval_text(est['value'], est['interval'])}"
                             + (f" ({est['reason']})" if est["reason"] else ""))
        return "beyond the measured budgets: " + "; ".join(parts)
    return f"unavailable: {sp['reason']}"


def arm_cells(a: dict) -> list[str]:
    """One row of the study table (shared by report.md and report.html)."""
    edge = {"low": " (low edge!)", "high": " (high edge!)", "single": " (one LR: untuned)"}.get(a["grid_edge"], "")
    d = a["paired_diff"]
    diff, bonferroni, p = "-", "-", "-"
    if d is not None:
        diff = f"{d['mean']:+.3g}" + (f" [{d['ci95'][0]:+.3g}, {d['ci95'][1]:+.3g}]" if d["ci95"] else
                                      " [one seed: no interval]")
        if d["ci_bonferroni"]:
            bonferroni = f"[{d['ci_bonferroni'][0]:+.3g}, {d['ci_bonferroni'][1]:+.3g}]"
        if d["p_value"] is not None:
            p = f"{d['p_value']:.2g} / {d['p_holm']:.2g}"
    tuned = a.get("tuned")
    if tuned:
        tuned_edge = {"low": " (low edge!)", "high": " (high edge!)"}.get(tuned["edge"], "")
        edge += f"; {tuned['key'].rsplit('.', 1)[-1]}={tuned['value']}{tuned_edge}"
    verdict = a["verdict"] + (f" ({d['correction']})" if d is not None and d["p_holm"] is not None else "")
    return [a["arm"], fmt(a["best_lr"]) + edge, fmt(a["final_val_loss"], a["final_val_loss_std"]), diff, bonferroni,
            p, verdict, speedup_text(a), f"{a['stable_lrs']}/{a['grid_lrs']}",
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


def choice_text(study: dict) -> str:
    """How each arm's LR was chosen, and whether the judgement shares its runs."""
    chosen = seeds_text(study["selection_seeds"])
    if study["clean_choice"]:
        return (f"Each arm's LR (and tuned value) was chosen on {chosen} over its grid, then run again at that LR on "
                f"fresh {seeds_text(study['judged_seeds'])}; every difference, verdict and speedup below is computed "
                "on those fresh runs alone, so the choice and the judgement share no run and the judged losses carry "
                "no winner's curse. The baseline's budget runs are on the same fresh seeds.")
    return (f"Each arm's LR (and tuned value) was chosen and is judged on the same runs ({chosen}): the best of a "
            "grid's losses is biased low (the winner's curse), for the baseline as for every arm, by an amount that "
            "grows with the grid and the seed noise, and nothing below corrects for it. Set compare.confirm_seeds to "
            "judge on fresh seeds.")


def correction_text(study: dict) -> str:
    m = study["compared_arms"]
    return (f"Each verdict tests the arm's paired difference against the baseline on the judged seeds (Student's t, "
            f"two-sided) and corrects over the {m} arm{'s' if m != 1 else ''} compared by Holm's step-down: an arm "
            f"is better or worse only where its Holm-adjusted p-value is under {study['alpha']:g}, which keeps the "
            "chance of any false verdict in the study under 5%. The raw 95% interval is shown beside Bonferroni's "
            f"({100 * (1 - study['alpha'] / max(m, 1)):.4g}% per arm), which is never narrower; Holm can decide "
            "where Bonferroni's interval still touches 0. Speedup intervals are 95% per arm, not corrected.")


def conclusions(study: dict, rows: list[dict]) -> str:
    """What the study can and cannot conclude, in the terms of its corrections, its seeds, its curve."""
    arms = study["arms"]
    n = len(study["judged_seeds"])
    params = next((r["num_params"] for r in rows if r.get("num_params")), None)
    edges = [a["arm"] for a in arms if a["grid_edge"]]
    decided = [f"{a['arm']} {a['verdict']}" for a in arms if a["verdict"] in ("better", "worse")]
    raw_only = [a["arm"] for a in arms if a["verdict"] not in ("better", "worse") and a["paired_diff"]
                and a["paired_diff"]["ci95"] and (a["paired_diff"]["ci95"][1] < 0 or a["paired_diff"]["ci95"][0] > 0)]
    beyond = [a for a in arms if a["speedup"]["method"] == "extrapolated"]
    text = (f"This study trained {len(rows)} runs of a {fmt(float(params)) if params else '?'}-parameter model, "
            f"{fmt(float(study['budget_tokens']))} tokens per full run, {len(arms)} arms. "
            + ("The LRs were chosen on other seeds than those judged. " if study["clean_choice"] else
               "The LRs were chosen on the runs that are judged (winner's curse not corrected). ")
            + f"After Holm's correction over {plural(study['compared_arms'], 'arm')}, at {plural(n, 'judged seed')}: ")
    text += (", ".join(decided) + " than the baseline. " if decided else
             "no arm is distinguishable from the baseline. ")
    if raw_only:
        text += (f"{', '.join(raw_only)}: the raw 95% interval excludes 0 but the corrected test does not decide; "
                 "treat as a lead for a study with more seeds, not a result. ")
    text += (f"With {plural(n, 'seed')} the t interval has {plural(max(n - 1, 0), 'degree')} of freedom, so only "
             "differences several times the seeds' spread are resolved. ")
    if beyond:
        answered = [f for f in SHORT_NAMES if any(a["speedup"]["families"][f]["value"] is not None for a in beyond)]
        text += ("The speedups of " + ", ".join(a["arm"] for a in beyond) + " lie beyond the budgets the baseline "
                 "ran, so they depend on the law assumed: "
                 + ("the laws shown can disagree by more than their intervals, which carry the seeds' noise but not "
                    "that choice" if len(answered) > 1 else
                    f"here only the {SHORT_NAMES[answered[0]]} law gives one (the others refuse, with the reason in "
                    "the table), and its interval carries the seeds' noise, not the choice of law" if answered else
                    "here every law refuses (the reasons are in the table)")
                 + "; a run of the baseline at a larger budget would settle it. ")
    text += ("Inside the measured budgets a speedup is read from the baseline's own points (its own speedup is 1 at "
             "each). Nothing here says how the ranking holds at larger models or budgets (the literature finds "
             "speedups shrink with scale). ")
    if edges:
        text += f"The best LR sits on the grid's edge for {', '.join(edges)}: those arms may be under-tuned. "
    return text + ("Throughput and memory were measured with runs sharing the machine's cores, so their ratios are "
                   "indicative only.")


CURVE_HEAD = ["tokens", "share of the budget", "steps", "LR warm-up steps (share)", "seeds", "final val loss",
              "speedup of the baseline at its own budget"]


def curve_cells(study: dict) -> list[list[str]]:
    """The baseline's budget runs: how each was made, its loss, and the self-check (its own speedup)."""
    curve, out = study["curve"], []
    for i, (made, check) in enumerate(zip(curve["runs"], study["self_check"])):
        warm, steps = made["warmup_steps"], made["total_steps"]
        share = f"{warm} ({warm / steps:.1%})" if warm is not None and steps else "-"
        loss = fmt(curve["mean"][i], curve["std"][i]) if i < len(curve["mean"]) else "-"
        seeds = ", ".join(map(str, made["seeds"])) + (f" (diverged: {made['diverged']})" if made["diverged"] else "")
        out.append([fmt(float(made["tokens"])), f"{made['tokens'] / study['budget_tokens']:.3g}", fmt(steps), share,
                    seeds, loss, fmt(check["speedup"])])
    return out


def curve_notes(study: dict) -> list[str]:
    """How the budget runs were made (schedule shape, the optimizer's own step counts) and the two laws' fits."""
    curve, baseline = study["curve"], study["baseline"]
    runs = curve["runs"]
    notes = [f"{baseline} at its chosen LR at each budget, on the judged seeds, with the same schedule "
             f"({runs[0]['schedule'] if runs else '?'}) scaled to the run: the LR warm-up is the same share of each "
             "run's steps (schedule.warmup_fraction), and the decay ends at each run's last step."]
    made = [r for r in runs if r["total_steps"] and r["warmup_steps"] is not None]
    shares = [r["warmup_steps"] / r["total_steps"] for r in made]
    if shares and max(shares) - min(shares) > max(1.0 / r["total_steps"] for r in made):  # (more than rounding)
        notes.append("**The warm-up is not the same share of every budget run "
                     f"({', '.join(f'{x:.1%}' for x in shares)}): the shorter runs are not the same schedule, and the "
                     "curve is bent by it. Rerun them with schedule.warmup_fraction.**")
    counts = runs[0]["optimizer_step_counts"] if runs else None
    notes.append("The baseline's optimizer has no hyperparameter counted in steps." if not counts else
                 "Its own hyperparameters counted in steps stay as set at every budget (auto: the run's own steps): "
                 + ", ".join(f"optimizer.{k}={v}" for k, v in counts.items()) + ".")
    for family, fit in curve["families"].items():
        name = FAMILY_NAMES[family]
        if family == "power_law" and "a" in fit:
            notes.append(f"{name}: a = {fit['a']:.4g}, B = {fit['B']:.4g}, b = {fit['b']:.4g}, R² = {fit['r2']:.4f}.")
        elif family == "log_linear" and "c" in fit:
            notes.append(f"{name}: c = {fit['c']:.4g}, k = {fit['k']:.4g}, R² = {fit['r2']:.4f}.")
        else:
            notes.append(f"{name}: refused, {fit['reason']}.")
    notes.append(f"Speedup intervals: {study['speedup_interval_method']}.")
    return notes


def markdown(study: dict, ranked: list[dict], rows: list[dict], fair: dict, target: float | None) -> str:
    lines = ["# Comparison report", "", f"Baseline: **{study['baseline']}**. Each arm at the best LR of its grid; "
             "the loss is the mean final validation loss over the judged seeds; Δ is the mean paired difference "
             "against the baseline over those seeds (negative is better); speedup is D_eff / D, the tokens the "
             "baseline needs for the arm's loss over the arm's.", ""]
    lines += ["| " + " | ".join(ARM_HEAD) + " |", "|" + " --- |" * len(ARM_HEAD)]
    lines += ["| " + " | ".join(arm_cells(a)) + " |" for a in study["arms"]]
    lines += ["", "## What this can and cannot conclude", "", conclusions(study, rows), "",
              "## How the LR was chosen", "", choice_text(study), "", "## Verdicts and their correction", "",
              correction_text(study), ""]
    warnings = grid_warnings(study)
    if warnings:
        lines += ["## Grid edges", ""] + [f"- **{w}**" for w in warnings] + [""]
    lines += ["## The baseline's budget runs", "", "| " + " | ".join(CURVE_HEAD) + " |",
              "|" + " --- |" * len(CURVE_HEAD)]
    lines += ["| " + " | ".join(c) + " |" for c in curve_cells(study)]
    lines += [""] + [f"- {note}" for note in curve_notes(study)]
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
                 and not r["budget_run"] and r["tuned_value"] == e["tuned_value"] and r["seed"] in e["seed_list"]]
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
             "at the full budget on the selection seeds (the grid the LRs were chosen on), ranked by final "
             "validation loss (mean ± std across seeds).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(setting_cells(i, e, rows)) + " |" for i, e in enumerate(ranked, 1)]
    return lines
