"""The compare command end to end (real sweeps in a subprocess, as users run them): one small study shared by the
tests of this module, whose report must equal the runs' own files and render in a real browser; a killed sweep
that resumes; a grid extended past its edge; an arm tuned over its clipping threshold as well as its LR."""

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from browser import check_page, chromium
from conftest import TINY
from llmstable.metrics import read_jsonl
from llmstable.loss_plot import final_curve
from llmstable.statistics import t975

pytestmark = pytest.mark.subprocess  # (every study runs `llmstable compare`)

PNG = b"\x89PNG\r\n\x1a\n"
# AdamW over 0.003, 0.01 and an absurd 1e5 that diverges; Muon over 0.003 and 0.01; the LRs chosen on seed 0, each
# arm then judged at its LR on seeds 1 and 2; AdamW at its chosen LR also at 2 and 3 of the 6 steps on seeds 1 and 2:
# 13 runs of at most 6 steps.
STUDY = ["compare.arms=[adamw,muon]", "compare.grids.adamw=[0.003,0.01,100000.0]", "compare.grids.muon=[0.003,0.01]",
         "compare.seeds=[0]", "compare.confirm_seeds=[1,2]", "compare.target_loss=6.2", "train.max_steps=6",
         "train.eval_interval=3", "train.checkpoint_interval=3", "train.max_norm=null"]


def compare(sweep_dir, *args, **popen):
    cmd = [sys.executable, "-m", "llmstable.cli", "compare", "compare=quick_cpu", f"compare.sweep_dir={sweep_dir}",
           "compare.parallel=1", *TINY, "train.eval_interval=2", *args]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "sweep"
    result = compare(root, *STUDY)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, json.loads((root / "report.json").read_text())


def comparable(report):
    """report.json without what differs between two identical sweeps: timing, memory, paths."""
    def clean(row):
        return {k: v for k, v in row.items() if not k.startswith(("wall_s", "tokens_per_sec", "peak_memory"))}
    return {"ranked": [clean(r) for r in report["ranked"]], "runs": [clean(r) for r in report["runs"]],
            "fairness": report["fairness"]}


@pytest.mark.slow
def test_every_run_and_setting_in_the_report_equals_the_runs_own_files(study):
    root, report = study
    for name in ("report.md", "report.json", "report.html", "loss_curves.png", "lr_sensitivity.png", "speedup.png"):
        assert (root / name).exists(), name
    assert (root / "speedup.png").read_bytes().startswith(PNG)
    assert len(report["runs"]) == 13 and len(report["ranked"]) == 5
    for row in report["runs"]:
        run = root / row["run"]
        summary = json.loads((run / "summary.json").read_text())
        for key in ("final_val_loss", "best_val_loss", "spikes", "rollbacks", "skipped_steps", "skipped_samples",
                    "tokens_per_sec", "peak_memory_mb", "wall_s", "tokens", "initial_loss"):
            assert row[key] == (summary[key] if not row["diverged"] or key not in (
                "final_val_loss", "best_val_loss") else None), key
        assert row["optimizer_state_bytes_per_param"] == summary["optimizer_state_bytes"] / summary["num_params"]
        val = final_curve(read_jsonl(run / "metrics.jsonl"), "val/loss")
        if not row["diverged"]:
            assert row["tokens_to_target"] == next((t for t, v in val if v <= 6.2), None)
    bad = [r for r in report["runs"] if r["lr"] == 100000.0]
    assert all(r["diverged"] and r["diverged_step"] is not None for r in bad)
    assert report["ranked"][-1]["lr"] == 100000.0
    assert report["fairness"]["same_start_by_seed"] == {
        str(s): {"initial_weights": True, "first_batch": True} for s in (0, 1, 2)}


@pytest.mark.slow
def test_each_arms_best_lr_paired_difference_and_columns_follow_from_the_files(study):
    root, report = study
    arms = {a["arm"]: a for a in report["arms"]}
    assert report["baseline"] == "adamw" and list(arms) == ["adamw", "muon"]
    assert report["selection_seeds"] == [0] and report["judged_seeds"] == [1, 2] and report["clean_choice"]
    finals = {}
    for row in report["runs"]:
        if not row["budget_run"]:
            finals.setdefault((row["arm"], row["lr"]), {})[row["seed"]] = row["final_val_loss"]
    for name, arm in arms.items():
        chosen_on = {lr: v[0] for (a, lr), v in finals.items() if a == name and v.get(0) is not None}
        assert arm["best_lr"] == min(chosen_on, key=chosen_on.get)  # chosen on seed 0 alone
        assert arm["selection_final_val_loss"] == chosen_on[arm["best_lr"]]
        assert sorted(s for (a, lr), v in finals.items() if a == name and lr != arm["best_lr"] for s in v) == [0] * (
            len(arm["grid"]) - 1)  # the fresh seeds ran at the chosen LR only
        judged = finals[(name, arm["best_lr"])]
        assert arm["final_val_loss"] == pytest.approx(statistics.fmean([judged[1], judged[2]]), rel=1e-12)
    assert arms["adamw"]["stable_lrs"] == 2 and arms["adamw"]["grid_lrs"] == 3  # 1e5 diverged
    assert arms["adamw"]["grid_edge"] in (None, "low")  # 1e5 is the high edge, and it diverged
    assert arms["muon"]["grid_edge"] in ("low", "high")  # a grid of two LRs: the best is on an edge
    base = finals[("adamw", arms["adamw"]["best_lr"])]
    other = finals[("muon", arms["muon"]["best_lr"])]
    diffs = [other[s] - base[s] for s in (1, 2)]
    paired = arms["muon"]["paired_diff"]
    assert paired["mean"] == pytest.approx(statistics.fmean(diffs), rel=1e-12)
    half = t975(1) * statistics.stdev(diffs) / math.sqrt(2)
    assert paired["ci95"] == pytest.approx([paired["mean"] - half, paired["mean"] + half], rel=1e-9)
    assert paired["p_holm"] == paired["p_value"]  # one arm compared: Holm changes nothing
    assert arms["muon"]["verdict"] in ("better", "worse", "not distinguishable at 2 seeds")
    curve = report["curve"]
    assert curve["budgets"] == [2 * 8 * 32, 3 * 8 * 32, 6 * 8 * 32] and curve["seeds"] == [1, 2]  # 2, 3, 6 steps
    assert [r["total_steps"] for r in curve["runs"]] == [2, 3, 6]
    assert [c["speedup"] for c in report["self_check"]] == [1.0, 1.0, 1.0]
    assert arms["adamw"]["speedup"]["value"] == 1.0 and arms["adamw"]["speedup"]["interval"] == [1.0, 1.0]
    for arm in arms.values():
        speed = arm["speedup"]
        assert speed["method"] in ("interpolated", "extrapolated", "unavailable")
        if speed["method"] == "extrapolated":
            assert speed["value"] is None and set(speed["families"]) == {"power_law", "log_linear"}
        assert speed["method"] == "interpolated" or speed["reason"]
        assert arm["optimizer_state_bytes_per_param"] > 0 and arm["lr_sensitivity"] >= 0
    assert arms["muon"]["optimizer_state_bytes_per_param"] < arms["adamw"]["optimizer_state_bytes_per_param"]
    md = (root / "report.md").read_text()
    assert f"| muon | {arms['muon']['best_lr']:.4g} (" in md and "edge!" in md
    assert "What this can and cannot conclude" in md and "compare.extend_grid=true" in md


@pytest.mark.slow
def test_the_html_report_renders_in_headless_chromium_with_every_image(study):
    root, report = study
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing on CI: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed here (apt-get install -y chromium); CI installs it")
    page = (root / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    seen = check_page(root / "report.html")
    assert seen["title"] == "Comparison report"
    assert seen["images"] == 3 and seen["loaded"] == 3
    assert seen["arm_rows"] == len(report["arms"]) and seen["arms"] == [a["arm"] for a in report["arms"]]
    assert seen["table_height"] > 0


@pytest.mark.long
def test_extend_grid_adds_the_next_lr_past_the_edge_and_runs_only_what_is_missing(study):
    # In the shared study's own directory (its runs name their init file by absolute path, so a copy would not
    # resume): this test runs after the others of the module, which read the study before it grows.
    root = study[0]
    muon = next(a for a in study[1]["arms"] if a["arm"] == "muon")
    before = {p.name: (p / "metrics.jsonl").stat().st_mtime_ns for p in root.glob("*_seed*")}
    result = compare(root, *STUDY, "compare.extend_grid=true")
    assert result.returncode == 0, result.stderr[-3000:]
    added = {p.name for p in root.glob("*_seed*")} - set(before)
    assert {f"muon_lr{lr:g}_seed0" for lr in muon["extend_with"]} <= added
    assert all((root / name / "metrics.jsonl").stat().st_mtime_ns == t for name, t in before.items())
    report = json.loads((root / "report.json").read_text())
    assert len(next(a for a in report["arms"] if a["arm"] == "muon")["grid"]) == 3


@pytest.mark.slow
def test_a_killed_sweep_rerun_skips_finished_arms_and_reports_the_same(tmp_path):
    args = ["compare.arms=[adamw,spam]", "compare.lrs=[0.003]", "compare.seeds=[0]", "compare.confirm_seeds=[]",
            "compare.budget_fractions=[1.0]", "train.max_steps=40", "train.checkpoint_interval=5"]
    assert compare(tmp_path / "whole", *args).returncode == 0
    root = tmp_path / "killed"
    proc = compare(root, *args, start_new_session=True)
    deadline = time.time() + 600
    while not list(root.glob("spam_*/checkpoints/step_00000010")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-way through the second arm
    proc.wait()
    finished = next(root.glob("adamw_*"))
    before = (finished / "metrics.jsonl").stat()
    assert not (root / "report.md").exists() and not list(root.glob("spam_*/summary.json"))
    result = compare(root, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    after = (finished / "metrics.jsonl").stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)  # not re-run
    resumed = [e for e in read_jsonl(next(root.glob("spam_*")) / "events.jsonl") if e["event"] == "resume"]
    assert resumed and resumed[0]["step"] >= 10
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    again = json.loads((root / "report.json").read_text())
    assert comparable(again) == comparable(whole)


def test_an_arm_tuned_over_its_clipping_threshold_runs_each_value_and_keeps_the_best(tmp_path):
    args = ["compare.arms=[adamw,adamw_clip]", "compare.lrs=[0.003]", "compare.seeds=[0]", "compare.confirm_seeds=[]",
            "compare.budget_fractions=[1.0]", "train.max_steps=4", "train.checkpoint_interval=2"]
    result = compare(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    values = (0.1, 0.25, 0.5)  # configs/arm/adamw_clip.yaml
    names = [f"adamw_clip_lr0.003_seed0_max_norm{v}" for v in values]
    assert sorted(p.name for p in tmp_path.glob("adamw_clip_*")) == names
    finals = {}
    for value, name in zip(values, names):
        assert f"max_norm: {value}" in (tmp_path / name / "config.yaml").read_text()
        finals[value] = json.loads((tmp_path / name / "summary.json").read_text())["final_val_loss"]
    assert len(set(finals.values())) == 3  # the threshold changed the runs
    report = json.loads((tmp_path / "report.json").read_text())
    clip = next(a for a in report["arms"] if a["arm"] == "adamw_clip")
    best = min(finals, key=finals.get)
    assert clip["tuned"]["key"] == "train.max_norm" and clip["tuned"]["value"] == best
    assert clip["final_val_loss"] == finals[best] and clip["best_lr"] == 0.003
    assert clip["tuned"]["by_value"] == {str(v): {"best_lr": 0.003, "final_val_loss": finals[v]} for v in values}
    md = (tmp_path / "report.md").read_text()
    assert f"max_norm={best}" in md and all(f"adamw_clip (max_norm={v})" in md for v in values)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/metrics.jsonl")}
    assert compare(tmp_path, *args).returncode == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/metrics.jsonl")} == stamps  # nothing ran again


def test_a_sweep_keeps_freed_activation_pages_unless_the_user_set_the_allocator():
    # In a child process: the setting also reaches this process's allocator (mallopt), which the suite must keep.
    code = ("import os; from llmstable.compare import set_run_environment; from llmstable.config.sweep import "
            "SweepConfig; set_run_environment(SweepConfig(parallel=1)); "
            "print(os.environ['MALLOC_MMAP_THRESHOLD_'], os.environ['MALLOC_TRIM_THRESHOLD_'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "MALLOC_TRIM_THRESHOLD_": "12345"})  # the user's own setting wins
    assert out.stdout.split() == [str(256 << 20), "12345"]  # inherited by the run processes
