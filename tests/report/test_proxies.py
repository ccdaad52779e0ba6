"""The proxy study's analysis (llmstable.report.proxies) on constructed runs whose answers are known: the LR
sensitivity per arm, and each claim's rule, including where it is split or inside the noise."""

import math

import pytest

from llmstable.report.proxies import NOISE, claims, role, summarise

LRS = [0.001, 0.01, 0.1, 0.3]
STABILIZERS = {"adamw": [], "adamw_qk_norm": ["qk_norm"], "adamw_zloss": ["zloss"],
               "adamw_qk_zloss": ["qk_norm", "zloss"], "s3_spike_guard": ["spike_guard"]}


def run(arm, lr, loss, attn=(1.0, 2.0), log_z=(7.0, 7.0), spikes=0, diverged=False):
    row = {"arm": arm, "lr": lr, "seed": 0, "optimizer": "s3" if arm.startswith("s3") else "adamw",
           "stabilizers": STABILIZERS[arm], "final_val_loss": None if diverged else loss, "diverged": diverged,
           "diverged_step": 5 if diverged else None, "initial_loss": 7.0, "spikes": spikes, "rollbacks": 0,
           "skipped_samples": 0, "run": f"{arm}_lr{lr}_seed0",
           "attn_curve": [(10 * (i + 1), v) for i, v in enumerate(attn)],
           "log_z_curve": [(10 * (i + 1), v) for i, v in enumerate(log_z)]}
    row["role"] = role(row)
    return row


def size(model, rows, n=1e5):
    return summarise({"model": model, "num_params": 2 * n, "non_embedding_params": n, "rows": rows})


def grid(arm, losses, **by_lr):
    return [run(arm, lr, loss, **by_lr.get(str(lr), {})) for lr, loss in zip(LRS, losses)]


def claim(sizes, name):
    return next(c for c in claims(sizes) if c["id"] == name)


def test_lr_sensitivity_is_the_mean_capped_excess_over_the_best_and_a_diverged_lr_counts_at_init():
    rows = grid("adamw", [5.0, 4.0, 6.0, 9.0]) + grid("adamw_qk_norm", [5.0, 4.0, 4.5, 4.5])
    rows[3] = run("adamw", 0.3, None, diverged=True)
    s = size("m", rows)
    base, qk = s["arms"]
    assert base["role"] == "baseline" and qk["role"] == "qk_norm"
    assert base["lr_sensitivity"] == pytest.approx((1.0 + 0.0 + 2.0 + 3.0) / 4)  # 7.0 (init) for the diverged
    assert qk["lr_sensitivity"] == pytest.approx((1.0 + 0.0 + 0.5 + 0.5) / 4)
    assert base["best_lr"] == 0.01 and base["loss_by_lr"][0.3] is None
    assert s["top_lrs"] == [0.1, 0.3] and {r["lr"] for r in s["stability"]} == {0.1, 0.3}
    assert claim([s], "qk_norm_lr_sensitivity")["verdict"] == "reproduced"


def attention_size(model, base_curve, cured_curve):
    rows = grid("adamw", [5, 4, 5, 6], **{"0.1": {"attn": base_curve}, "0.3": {"attn": base_curve}})
    rows += grid("adamw_qk_norm", [5, 4, 5, 6], **{"0.1": {"attn": cured_curve}, "0.3": {"attn": cured_curve}})
    return size(model, rows)


def test_attention_growth_needs_tenfold_growth_and_a_tenfold_gap_at_every_size_and_top_lr():
    grows, bounded = (5.0, 60.0, 500.0), (3.0, 6.0, 8.0)
    assert claim([attention_size("a", grows, bounded), attention_size("b", grows, bounded)],
                 "attention_logit_growth")["verdict"] == "reproduced"
    flat = (50.0, 60.0, 70.0)  # large but not growing 10x
    assert claim([attention_size("a", flat, bounded)], "attention_logit_growth")["verdict"] == "not reproduced"
    assert claim([attention_size("a", grows, (3.0, 60.0, 100.0))],  # QK-norm's own peak too close
                 "attention_logit_growth")["verdict"] == "not reproduced"
    split = claim([attention_size("a", grows, bounded), attention_size("b", flat, bounded)], "attention_logit_growth")
    assert split["verdict"] == "not resolved at this scale" and "b at 0.3" in split["measured"]


def test_a_sensitivity_difference_inside_the_noise_is_not_resolved():
    base = grid("adamw", [5.0, 4.0, 6.0, 7.0])
    close = grid("adamw_zloss", [5.0, 4.0, 6.0, 7.0 - 2 * NOISE])  # 0.5 NOISE lower on the mean over 4 LRs
    far = grid("adamw_zloss", [5.0, 4.0, 5.0, 6.0])
    worse = grid("adamw_zloss", [5.5, 4.0, 6.5, 7.0])
    assert claim([size("a", base + close)], "zloss_lr_sensitivity")["verdict"] == "not resolved at this scale"
    assert claim([size("a", base + far)], "zloss_lr_sensitivity")["verdict"] == "reproduced"
    assert claim([size("a", base + worse)], "zloss_lr_sensitivity")["verdict"] == "not reproduced"
    mixed = claim([size("a", base + far), size("b", base + worse)], "zloss_lr_sensitivity")
    assert mixed["verdict"] == "not resolved at this scale" and "b: 1.5 -> 1.75" in mixed["measured"]


def test_sensitivity_growing_with_size_compares_the_largest_with_the_smallest():
    small = size("s", grid("adamw", [5.0, 4.0, 4.5, 5.0]))
    large = size("l", grid("adamw", [5.0, 4.0, 6.0, 7.0]), n=1e6)
    assert claim([small, large], "lr_sensitivity_grows_with_size")["verdict"] == "reproduced"
    assert claim([large, small], "lr_sensitivity_grows_with_size")["verdict"] == "not reproduced"


def log_z_size(base_z, cured_z, base_diverged=False):
    top = {"log_z": (8.0, base_z)}
    rows = grid("adamw", [5, 4, 5, 6], **{"0.1": top, "0.3": top})
    if base_diverged:
        rows[-1] = run("adamw", 0.3, None, log_z=(8.0, 9.0), diverged=True)
    cured = {"log_z": (8.0, cured_z)}
    return size("m", rows + grid("adamw_zloss", [5, 4, 5, 6], **{"0.1": cured, "0.3": cured}))


def test_output_logit_divergence_needs_a_drift_past_twice_ln_v_that_z_loss_halves():
    assert claim([log_z_size(-20.0, -3.0)], "output_logit_divergence")["verdict"] == "reproduced"  # 20 > 2 * 7
    assert claim([log_z_size(7.5, 0.5)], "output_logit_divergence")["verdict"] == "not reproduced"  # no drift
    assert claim([log_z_size(-20.0, -15.0)], "output_logit_divergence")["verdict"] == "not reproduced"  # no cure
    split = claim([log_z_size(7.5, 0.5, base_diverged=True)], "output_logit_divergence")  # diverged at 0.3 only
    assert split["verdict"] == "not resolved at this scale" and "(diverged)" in split["measured"]


def test_s3_is_judged_at_the_guarded_lr_nearest_ten_times_adamws_best():
    base = grid("adamw", [5.0, 4.0, 6.0, 7.0])  # best 0.01 -> S3 judged at 0.1
    calm = [run("s3_spike_guard", 0.1, 5.0, spikes=1), run("s3_spike_guard", 0.3, 6.0, spikes=9)]
    assert claim([size("a", base + calm)], "s3_rare_spikes")["verdict"] == "reproduced"
    spiky = [run("s3_spike_guard", 0.1, 5.0, spikes=2)]
    assert claim([size("a", base + spiky)], "s3_rare_spikes")["verdict"] == "not reproduced"
    far = grid("adamw", [4.0, 5.0, 6.0, 7.0])  # best 0.001 -> 10x is 0.01, and no S3 run within 2x of it
    out = claim([size("a", far + calm)], "s3_rare_spikes")
    assert out["verdict"] == "not resolved at this scale" and "no S3 run near" in out["measured"]
    assert math.isclose(size("a", base)["arms"][0]["best_lr"], 0.01)
