"""Checkpoints off the step path (llmstable.checkpointer): the background write gives the same bytes as a write in
the loop, a rollback to a checkpoint still in the ring reads nothing from disk and gives the same run, a
checkpoint counts by the step inside it rather than by its name, and a fault fires once per run directory."""

import subprocess
import sys

import pytest

from conftest import TINY
from llmstable import checkpoint as ckpt
from llmstable.metrics import read_jsonl
from llmstable.trainer import train

GUARD = ["train.max_steps=40", "train.checkpoint_interval=5", "train.eval_interval=20", "train.keep_checkpoints=4",
         "stabilizer=[spike_guard]", "stabilizer.spike_guard.min_history=8", "stabilizer.spike_guard.window=16",
         "stabilizer.spike_guard.good_after_steps=4", "stabilizer.spike_guard.skip_steps=0",
         "stabilizer.spike_guard.watch=[loss]", "fault.loss_scale_steps=[27]"]


def rows(run):
    return {(r["step"], "train/loss" in r): r.get("train/loss", r.get("val/loss"))
            for r in read_jsonl(run / "metrics.jsonl")}


@pytest.mark.trains
def test_a_background_write_gives_the_bytes_of_a_write_in_the_loop(tiny_config, tmp_path):
    for name, flag in (("async", "true"), ("sync", "false")):
        train(tiny_config(f"train.checkpoint_async={flag}", run_dir=tmp_path / name))
    for step in ("step_00000003", "step_00000006"):
        a, s = (tmp_path / name / "checkpoints" / step for name in ("async", "sync"))
        for file in ("model.safetensors", "optimizer.pt", "rng.pt", "state.json"):
            assert (a / file).read_bytes() == (s / file).read_bytes(), (step, file)
        assert ckpt.verify(a) is None
    blocked = [e["blocked_s"] for e in read_jsonl(tmp_path / "async" / "events.jsonl") if e["event"] == "checkpoint"]
    assert len(blocked) == 2 and all(b >= 0 for b in blocked)


@pytest.mark.trains
def test_a_rollback_served_from_the_ring_reads_no_checkpoint_and_gives_the_same_run(tiny_config, tmp_path,
                                                                                   monkeypatch):
    train(tiny_config(*GUARD, "stabilizer.spike_guard.ring_size=0", run_dir=tmp_path / "disk"))
    reads = []
    for name in ("load_checkpoint", "verify"):
        original = getattr(ckpt, name)
        monkeypatch.setattr(ckpt, name, lambda *a, _o=original, _n=name, **k: reads.append(_n) or _o(*a, **k))
    summary = train(tiny_config(*GUARD, run_dir=tmp_path / "ring"))
    assert summary["rollbacks"] == 1
    assert reads == []  # no checkpoint was read or hashed: the rollback came from memory
    assert rows(tmp_path / "ring") == rows(tmp_path / "disk")


@pytest.mark.trains
def test_a_renamed_checkpoint_counts_as_the_step_inside_it(tiny_config, tmp_path, caplog):
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=8", "train.checkpoint_interval=2", "train.keep_checkpoints=3", run_dir=run))
    checkpoints = run / "checkpoints"
    (checkpoints / "step_00000004").rename(checkpoints / "step_00000099")
    assert [ckpt.content_step(p) for p in ckpt.list_checkpoints(checkpoints)] == [8, 6, 4]
    summary = train(tiny_config("train.max_steps=10", "train.checkpoint_interval=2", "train.keep_checkpoints=3",
                                run_dir=run))
    assert summary["resumed_from_step"] == 8  # never back to the impostor's step 4
    assert any("step_00000099 holds step 4" in r.message for r in caplog.records)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000006", "step_00000008", "step_00000010"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_fault_fires_once_per_run_directory_so_the_same_command_resumes(tmp_path):
    command = [sys.executable, "-m", "llmstable.cli", "train", *TINY, "train.max_steps=10",
               "train.checkpoint_interval=3", "fault.kill_in_checkpoint_at_step=6", f"run_dir={tmp_path}/run"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == -9, first.stderr[-2000:]
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)  # the very same command
    assert again.returncode == 0, again.stderr[-2000:]
    assert '"steps": 10' in again.stdout
    assert (tmp_path / "run" / "faults" / "rank0.json").is_file()
