"""The per-arm study on constructed run rows whose answers are known: best LR by the mean over seeds, the grid
edge, the paired difference and its corrected verdict, the LR chosen on some seeds and judged on others, the
speedup read from the baseline's points, the stability and cost columns."""

import pytest

from llmstable.report.study import analyse

BUDGET = 1_000_000


def loss_at(tokens):
    return 3.0e3 * tokens**-0.5 + 2.5  # the baseline's constructed L(D)


def row(arm, lr, seed, loss, tokens=BUDGET, budget_run=False, diverged=False, **extra):
    return {"arm": arm, "lr": lr, "seed": seed, "final_val_loss": None if diverged else loss, "diverged": diverged,
            "planned_tokens": tokens, "budget_run": budget_run, "initial_loss": 8.0, "spikes": extra.get("spikes", 0),
            "rollbacks": 0, "skipped_samples": extra.get("skipped", 0), "tokens_per_sec": extra.get("tps", 1000.0),
            "peak_memory_mb": 500.0, "optimizer_state_bytes_per_param": extra.get("bytes", 8.0)}


def rows():
    out = []
    for seed, shift in ((0, 0.0), (1, 0.02)):  # seed 1 is worse for every arm alike: pairing removes it
        base = loss_at(BUDGET) + shift
        out += [row("adamw", 1e-3, seed, base + 0.3), row("adamw", 3e-3, seed, base),
                row("adamw", 1e-2, seed, base + 0.1)]
        out += [row("adamw", 3e-3, seed, loss_at(f * BUDGET) + shift, tokens=int(f * BUDGET), budget_run=True)
                for f in (0.25, 0.5)]
        # "fast" matches the baseline's loss at half the budget on seed 0; its best LR is the grid's high edge.
        fast = loss_at(BUDGET / 2) + shift
        out += [row("fast", 1e-3, seed, fast + 0.2), row("fast", 3e-3, seed, fast, spikes=2, skipped=64, tps=500.0,
                                                             bytes=4.0)]
        out += [row("fast", 1e-2, seed, None, diverged=True)]
    return out


def test_best_lr_edge_and_paired_difference():
    study = analyse(rows(), "adamw")
    base, fast = study["arms"]
    assert base["best_lr"] == 3e-3 and base["grid_edge"] is None and base["verdict"] == "baseline"
    # 1e-2 diverged on every seed, so the best LR is 3e-3, which is not the edge: the edge is 1e-2.
    assert fast["best_lr"] == 3e-3 and fast["grid_edge"] is None
    diff = loss_at(BUDGET / 2) - loss_at(BUDGET)
    assert fast["paired_diff"]["mean"] == pytest.approx(diff)
    assert fast["paired_diff"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert fast["verdict"] == "worse"  # a higher loss than the baseline, with no spread between seeds
    assert not study["clean_choice"] and study["selection_seeds"] == study["judged_seeds"] == [0, 1]


def test_the_speedup_is_read_from_the_baseline_points_and_is_exactly_1_for_the_baseline():
    study = analyse(rows(), "adamw")
    base, fast = study["arms"]
    assert study["curve"]["budgets"] == [BUDGET // 4, BUDGET // 2, BUDGET]
    assert [c["speedup"] for c in study["self_check"]] == [1.0, 1.0, 1.0]
    assert base["speedup"]["method"] == "interpolated" and base["speedup"]["value"] == 1.0
    assert base["speedup"]["interval"] == (1.0, 1.0)
    # "fast" reaches the baseline's loss at D/2 on every seed (each seed's shift is in both): a measured point.
    assert fast["speedup"]["method"] == "interpolated" and fast["speedup"]["value"] == pytest.approx(0.5, rel=1e-12)


def test_the_lr_is_chosen_on_the_selection_seeds_and_judged_on_fresh_ones():
    data = [r for r in rows() if r["seed"] == 0 and not r["budget_run"]]
    # seed 0 alone picks 1e-3 for "fast" (lucky there); on the fresh seeds 5 and 6 it is run at 1e-3 only, and a
    # stray fresh run at 3e-3 (better still) must not be judged: the choice was made on seed 0.
    data = [dict(r, final_val_loss=r["final_val_loss"] - 0.3) if r["arm"] == "fast" and r["lr"] == 1e-3 else r
            for r in data]
    for seed, shift in ((5, 0.01), (6, -0.01)):
        data += [row("adamw", 3e-3, seed, loss_at(BUDGET) + shift),
                 row("fast", 1e-3, seed, loss_at(BUDGET) + 0.05 + shift + 0.001 * seed),
                 row("fast", 3e-3, seed, loss_at(BUDGET) - 1.0)]
        data += [row("adamw", 3e-3, seed, loss_at(f * BUDGET) + shift, tokens=int(f * BUDGET), budget_run=True)
                 for f in (0.25, 0.5)]
    study = analyse(data, "adamw", confirm_seeds=[5, 6])
    base, fast = study["arms"]
    assert study["clean_choice"] and study["selection_seeds"] == [0] and study["judged_seeds"] == [5, 6]
    assert fast["best_lr"] == 1e-3 and fast["judged_seeds"] == [5, 6]
    assert fast["selection_final_val_loss"] == pytest.approx(loss_at(BUDGET / 2) + 0.2 - 0.3)
    assert fast["final_val_loss"] == pytest.approx(loss_at(BUDGET) + 0.05 + 0.0055)
    assert fast["paired_diff"]["n"] == 2 and fast["paired_diff"]["mean"] == pytest.approx(0.0555)
    assert study["curve"]["seeds"] == [5, 6]


def test_verdicts_are_corrected_over_the_arms_by_holm():
    """Three arms against the baseline over 4 seeds, each with a known raw p-value; Holm multiplies the smallest by
    3, the next by 2, the largest by 1 (never below an earlier one), and only adjusted p < 0.05 decides."""
    diffs = {"a": [-0.10, -0.12, -0.09, -0.11], "b": [-0.03, -0.05, -0.01, -0.04], "c": [0.03, -0.01, 0.05, 0.02]}
    data = []
    for seed in range(4):
        data.append(row("adamw", 3e-3, seed, 5.0 + 0.1 * seed))
        data += [row(arm, 3e-3, seed, 5.0 + 0.1 * seed + d[seed]) for arm, d in diffs.items()]
    study = analyse(data, "adamw")
    arms = {a["arm"]: a for a in study["arms"]}
    raw = {k: arms[k]["paired_diff"]["p_value"] for k in diffs}
    order = sorted(raw, key=raw.get)
    want, running = {}, 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (3 - i) * raw[k]))
        want[k] = running
    assert {k: arms[k]["paired_diff"]["p_holm"] for k in diffs} == pytest.approx(want)
    assert raw["b"] < 0.05 < want["b"]  # raw 95% excludes 0, the corrected test does not decide
    assert arms["a"]["verdict"] == "better" and arms["b"]["verdict"] == "not distinguishable at 4 seeds"
    low, high = arms["b"]["paired_diff"]["ci_bonferroni"]
    assert low < 0 < high and arms["b"]["paired_diff"]["ci95"][1] < 0  # Bonferroni's interval is the wider
    assert study["compared_arms"] == 3


def test_stability_and_cost_columns():
    study = analyse(rows(), "adamw")
    base, fast = study["arms"]
    assert (base["stable_lrs"], base["grid_lrs"]) == (3, 3) and (fast["stable_lrs"], fast["grid_lrs"]) == (2, 3)
    assert fast["spikes"] == 2 and fast["skipped_samples"] == 64
    # Wortsman: mean over the grid of min(loss, 8.0) minus the best; the diverged LR counts as 8.0.
    best = loss_at(BUDGET / 2) + 0.01
    assert fast["lr_sensitivity"] == pytest.approx(((best + 0.2) + best + 8.0) / 3 - best)
    assert fast["tokens_per_sec_rel"] == 0.5 and fast["optimizer_state_bytes_per_param"] == 4.0


def test_a_grid_whose_best_lr_is_its_edge_is_flagged_with_the_next_lr():
    data = [r for r in rows() if not (r["arm"] == "adamw" and r["lr"] == 1e-3)]
    data = [dict(r, final_val_loss=r["final_val_loss"] - 1 if r["lr"] == 1e-2 and r["arm"] == "adamw"
                 and not r["budget_run"] else r["final_val_loss"]) for r in data]
    base = analyse(data, "adamw")["arms"][0]
    assert base["best_lr"] == 1e-2 and base["grid_edge"] == "high"
    assert base["extend_with"] == [pytest.approx(1e-2 * 1e-2 / 3e-3, rel=1e-3)]


def test_an_arm_tuned_over_one_more_key_keeps_its_best_value_and_flags_an_edge():
    # "clip" is tuned over max_norm as well as the LR: 0.25 is best (at LR 3e-3), 0.1 second, 0.5 worst.
    tuned = {0.1: 0.05, 0.25: 0.0, 0.5: 0.2}
    data = [r for r in rows() if r["arm"] == "adamw"]
    for seed in (0, 1):
        for value, extra in tuned.items():
            for lr, offset in ((1e-3, 0.3), (3e-3, 0.0), (1e-2, 0.1)):
                data.append(dict(row("clip", lr, seed, loss_at(BUDGET) - 0.1 + extra + offset + 0.02 * seed),
                                 tuned_key="train.max_norm", tuned_value=value))
    study = analyse(data, "adamw")
    clip = study["arms"][1]
    assert clip["tuned"]["key"] == "train.max_norm" and clip["tuned"]["value"] == 0.25
    assert clip["tuned"]["edge"] is None and clip["tuned"]["values"] == [0.1, 0.25, 0.5]
    assert clip["tuned"]["by_value"]["0.5"]["final_val_loss"] == pytest.approx(loss_at(BUDGET) + 0.11)
    # Every column is that of the chosen value: its LR grid, and the paired difference against the baseline.
    assert clip["best_lr"] == 3e-3 and clip["grid_lrs"] == 3
    assert clip["paired_diff"]["mean"] == pytest.approx(-0.1)
    assert study["arms"][0]["tuned"] is None
    # The best value on the edge of those tried is flagged, like an LR.
    edge = [dict(r, final_val_loss=r["final_val_loss"] - 1) if r.get("tuned_value") == 0.5 else r for r in data]
    assert analyse(edge, "adamw")["arms"][1]["tuned"] | {"by_value": None} == {
        "key": "train.max_norm", "value": 0.5, "values": [0.1, 0.25, 0.5], "edge": "high", "by_value": None}
