"""The compare command end to end (real sweeps in a subprocess, as users run them) and the report's numbers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY
from llmstable.metrics import read_jsonl
from llmstable.plot import final_curve

PNG = b"\x89PNG\r\n\x1a\n"


def compare(sweep_dir, *args, **popen):
    cmd = [sys.executable, "-m", "llmstable.cli", "compare", "compare=quick_cpu", f"compare.sweep_dir={sweep_dir}",
           *TINY, "train.eval_interval=2", *args]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def comparable(report):
    """report.json without what differs between two identical sweeps: timing, memory, paths."""
    def clean(row):
        return {k: v for k, v in row.items() if not k.startswith(("wall_s", "tokens_per_sec", "peak_memory_mb"))}
    return {"ranked": [clean(r) for r in report["ranked"]], "runs": [clean(r) for r in report["runs"]],
            "fairness": report["fairness"]}


@pytest.mark.slow
def test_two_arms_two_seeds_report_matches_each_runs_own_files(tmp_path):
    root = tmp_path / "sweep"
    result = compare(root, "compare.arms=[adamw,stable_spam]", "compare.seeds=[0,1]", "compare.target_loss=6.2")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("report.md", "report.json", "loss_curves.png"):
        assert (root / name).exists()
    assert (root / "loss_curves.png").read_bytes().startswith(PNG)
    report = json.loads((root / "report.json").read_text())
    assert len(report["runs"]) == 4 and len(report["ranked"]) == 2
    for row in report["runs"]:
        run = root / row["run"]
        summary = json.loads((run / "summary.json").read_text())
        for key in ("final_val_loss", "best_val_loss", "spikes", "rollbacks", "skipped_steps", "tokens_per_sec",
                    "peak_memory_mb", "wall_s", "tokens"):
            assert row[key] == summary[key], key
        val = final_curve(read_jsonl(run / "metrics.jsonl"), "val/loss")
        assert row["tokens_to_target"] == next((t for t, v in val if v <= 6.2), None)
    for entry in report["ranked"]:
        runs = [r for r in report["runs"] if r["arm"] == entry["arm"]]
        assert entry["final_val_loss"] == pytest.approx(sum(r["final_val_loss"] for r in runs) / 2, rel=1e-12)
    md = (root / "report.md").read_text()
    best = report["ranked"][0]
    assert f"| 1 | {best['arm']} |" in md and f"{best['final_val_loss']:.4g} ± " in md
    # Same start, checked: identical initial weights and first batch within a seed, different across seeds.
    assert report["fairness"]["same_start_by_seed"] == {
        "0": {"initial_weights": True, "first_batch": True}, "1": {"initial_weights": True, "first_batch": True}}
    hashes = {(r["seed"], r["init_hash"], r["first_batch_hash"]) for r in report["runs"]}
    assert len(hashes) == 2
    assert "optimizer.name" in report["fairness"]["differs"]
    assert report["fairness"]["shared"]["data.seq_len"] == 32


@pytest.mark.slow
def test_a_killed_sweep_rerun_skips_finished_arms_and_reports_the_same(tmp_path):
    args = ["compare.arms=[adamw,spam]", "train.max_steps=40", "train.checkpoint_interval=5"]
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


@pytest.mark.slow
def test_an_absurd_lr_diverges_without_failing_the_sweep(tmp_path):
    root = tmp_path / "sweep"
    result = compare(root, "compare.arms=[adamw]", "compare.lrs=[0.003,100000.0]", "train.max_steps=20",
                     "train.max_norm=null")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "report.json").read_text())
    bad = [r for r in report["runs"] if r["lr"] == 100000.0][0]
    good = [r for r in report["runs"] if r["lr"] == 0.003][0]
    assert bad["diverged"] and bad["diverged_step"] is not None and bad["final_val_loss"] is None
    assert not good["diverged"]
    assert report["ranked"][-1]["lr"] == 100000.0
    assert "diverged" in (root / "report.md").read_text() and "(step " in (root / "report.md").read_text()
    assert (root / "lr_sensitivity.png").read_bytes().startswith(PNG)
