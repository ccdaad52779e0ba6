"""The spike guard and crash recovery end to end: injected spikes, NaN, aborts, SIGKILL, damaged checkpoints,
refused resumes. Real training on the default corpus at tiny size."""

import json
import subprocess
import sys

import pytest

from conftest import TINY
from llmstable import checkpoint as ckpt
from llmstable.config import ConfigError
from llmstable.metrics import read_jsonl
from llmstable.resume import problem
from llmstable.trainer import SpikeAbort, train

LONG = ["train.max_steps=120", "train.eval_interval=60", "train.checkpoint_interval=10", "train.log_interval=10"]
GUARD = ["stabilizer=[spike_guard]", "stabilizer.spike_guard.min_history=16", "stabilizer.spike_guard.window=32",
         "stabilizer.spike_guard.good_after_steps=5", "stabilizer.spike_guard.skip_steps=0",
         "stabilizer.spike_guard.watch=[loss]", "stabilizer.spike_guard.lr_cut_after=0",
         "stabilizer.spike_guard.moment_reset_after=0"]
KEYS = ("train/loss", "optim/lr", "optim/grad_norm")


def events(run, kind=None):
    rows = read_jsonl(run / "events.jsonl")
    return [e for e in rows if kind is None or e["event"] == kind]


def last_rows(run):
    """The last metrics row per step: after a resume or rollback, replayed steps are logged again."""
    rows = {}
    for r in read_jsonl(run / "metrics.jsonl"):
        if "train/loss" in r:
            rows[r["step"]] = tuple(r[k] for k in KEYS)
    return rows


@pytest.mark.slow
@pytest.mark.trains
def test_injected_spikes_are_detected_rolled_back_and_skipped(tiny_config, tmp_path):
    clean = train(tiny_config(*LONG, run_dir=tmp_path / "clean"))
    run = tmp_path / "spiky"
    summary = train(tiny_config(*LONG, *GUARD, "fault.loss_scale_steps=[50,70,90]", run_dir=run))
    assert (summary["spikes"], summary["rollbacks"], summary["skipped_samples"]) == (3, 3, 3 * 96)
    assert [e["step"] for e in events(run, "spike")] == [50, 70, 90]
    rollbacks = events(run, "rollback")
    assert [(e["step"], e["to_step"]) for e in rollbacks] == [(50, 40), (70, 60), (90, 80)]
    # The data consumed since the good checkpoint, plus a 2-batch margin, is skipped: ordinals, not steps.
    assert [(e["start"], e["end"]) for e in events(run, "skip_data")] == [(320, 416), (576, 672), (832, 928)]
    final = ckpt.read_state(ckpt.latest_valid(run / "checkpoints"))
    assert final["ledger"]["skip_ranges"] == [[320, 416], [576, 672], [832, 928]]
    assert summary["steps"] == 120 and summary["aborted"] is False
    assert abs(summary["final_val_loss"] - clean["final_val_loss"]) / clean["final_val_loss"] < 0.02
    assert max(r[0] for r in last_rows(run).values()) < 10  # no x1000 loss survived into the logged curve


@pytest.mark.slow
@pytest.mark.trains
def test_a_nan_is_recovered_by_a_rollback(tiny_config, tmp_path):
    run = tmp_path / "nan"
    summary = train(tiny_config(*LONG, *GUARD, "stabilizer.spike_guard.min_history=100", "stabilizer.spike_guard.window=128",
                                "fault.nan_steps=[33]", run_dir=run))
    spike = events(run, "spike")[0]
    assert spike["step"] == 33 and spike["rule"] == "non_finite"  # caught before the detector is warm
    assert summary["rollbacks"] == 1 and summary["final_val_loss"] < 6.0


@pytest.mark.trains
def test_one_spiky_step_is_skipped_without_a_rollback(tiny_config, tmp_path):
    run = tmp_path / "skip"
    summary = train(tiny_config("train.max_steps=40", "stabilizer=[spike_guard]",
                                "stabilizer.spike_guard.min_history=8", "stabilizer.spike_guard.window=16",
                                "stabilizer.spike_guard.good_after_steps=5", "fault.loss_scale_steps=[30]",
                                run_dir=run))
    assert (summary["spikes"], summary["skipped_steps"], summary["rollbacks"]) == (1, 1, 0)
    assert [e["step"] for e in events(run, "skip_step")] == [30]


@pytest.mark.slow
@pytest.mark.trains
def test_spikes_everywhere_abort_cleanly_and_leave_the_good_checkpoint_loadable(tiny_config, tmp_path):
    from llmstable.export import load_trained

    run = tmp_path / "doomed"
    cfg = tiny_config(*LONG, *GUARD, "stabilizer.spike_guard.max_rollbacks=2",
                      f"fault.nan_steps={list(range(30, 121))}".replace(" ", ""), run_dir=run)
    with pytest.raises(SpikeAbort, match=r"after 2 rollbacks.*last good checkpoint .*step_\d+ is intact"):
        train(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["aborted"] is True and summary["rollbacks"] == 2 and summary["wall_s"] > 0
    assert events(run, "abort")
    good = ckpt.latest_good(run / "checkpoints")
    assert good is not None and ckpt.verify(good) is None
    model, _, _ = load_trained(good)
    assert model.num_params() > 0


def run_cli(*overrides):
    return subprocess.run([sys.executable, "-m", "llmstable.cli", "train", *TINY, *overrides],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["fault.kill_at_step=4", "fault.kill_at_step=8",
                                  "fault.kill_in_checkpoint_at_step=6"])
@pytest.mark.trains
@pytest.mark.subprocess
def test_resume_after_sigkill_matches_the_uninterrupted_run_bit_for_bit(tiny_config, tmp_path, kill):
    common = ["train.max_steps=10", "train.checkpoint_interval=3", "train.eval_interval=5"]
    train(tiny_config(*common, run_dir=tmp_path / "reference"))
    run = tmp_path / "killed"
    result = run_cli(*common, kill, f"run_dir={run}")
    assert result.returncode == -9, result.stderr[-2000:]  # really killed
    if "in_checkpoint" in kill:  # died halfway through writing step 6: the partial write is never chosen
        assert any(p.name.startswith(".tmp-step_00000006") for p in (run / "checkpoints").iterdir())
        assert ckpt.latest_valid(run / "checkpoints").name == "step_00000003"
    summary = train(tiny_config(*common, run_dir=run))  # the same command again, minus the fault
    assert summary["steps"] == 10
    assert last_rows(run) == last_rows(tmp_path / "reference")
    val = [r["val/loss"] for r in read_jsonl(run / "metrics.jsonl") if "val/loss" in r]
    want = [r["val/loss"] for r in read_jsonl(tmp_path / "reference" / "metrics.jsonl") if "val/loss" in r]
    assert val[-1] == want[-1]


@pytest.mark.slow
@pytest.mark.trains
def test_a_stop_right_after_a_rollback_resumes_on_the_new_branch_bit_for_bit(tiny_config, tmp_path):
    """Step 44's checkpoint is good, 48's not yet when the spike at 50 rolls back to 44: 48 belongs to the
    abandoned branch. A preemption then (or a crash) must resume from 44 with the data skip, not from 48."""
    from llmstable.preemption import Preempted

    common = ["train.max_steps=60", "train.eval_interval=30", "train.checkpoint_interval=4", "train.log_interval=1",
              *GUARD, "fault.loss_scale_steps=[50]"]
    reference = train(tiny_config(*common, run_dir=tmp_path / "reference"))
    assert reference["rollbacks"] == 1
    run = tmp_path / "stopped"
    with pytest.raises(Preempted):
        train(tiny_config(*common, "fault.signal_at_step=50", run_dir=run))
    assert [(e["step"], e["to_step"]) for e in events(run, "rollback")] == [(50, 44)]
    assert events(run, "preempted")[0]["step"] == 45  # (the flag is read at the next step boundary)
    names = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    assert names[:2] == ["step_00000045", "step_00000044"] and "step_00000048" not in names
    target = run / "checkpoints" / "step_00000044"  # rewritten good, with the skip of the spike's data
    assert ckpt.is_good(target) and ckpt.read_state(target)["ledger"]["skip_ranges"] == ckpt.read_state(
        ckpt.latest_valid(tmp_path / "reference" / "checkpoints"))["ledger"]["skip_ranges"]
    summary = train(tiny_config(*common, "fault.signal_at_step=50", run_dir=run))  # the same command again
    assert summary["steps"] == 60 and summary["rollbacks"] == 1
    assert last_rows(run) == last_rows(tmp_path / "reference")


@pytest.mark.trains
def test_a_damaged_newest_checkpoint_is_skipped_on_resume(tiny_config, tmp_path, caplog):
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=6", "train.checkpoint_interval=3", run_dir=run))
    newest = run / "checkpoints" / "step_00000006"
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (newest / "optimizer.pt").write_bytes(bytes(data))
    summary = train(tiny_config("train.max_steps=8", "train.checkpoint_interval=3", run_dir=run))
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 8
    assert any("skipping unreadable checkpoint" in r.message and "step_00000006" in r.message
               and "optimizer.pt" in r.message for r in caplog.records)


@pytest.mark.trains
def test_a_skipped_newer_checkpoint_does_not_make_pruning_delete_each_new_one(tiny_config, tmp_path):
    """keep_checkpoints=1 after resuming past a damaged newer checkpoint: the damaged one is not counted, so the
    checkpoints written since are kept (counted, each new one was deleted as soon as it was written)."""
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=8", "train.checkpoint_interval=4", "train.keep_checkpoints=2", run_dir=run))
    damaged = run / "checkpoints" / "step_00000008"
    data = bytearray((damaged / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (damaged / "optimizer.pt").write_bytes(bytes(data))
    summary = train(tiny_config("train.max_steps=6", "train.checkpoint_interval=1", "train.keep_checkpoints=1",
                                run_dir=run))
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6
    names = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    assert names == ["step_00000008", "step_00000006"]  # the damaged one (not deleted), and the newest of this run
    assert problem(run / "checkpoints" / "step_00000006") is None


@pytest.mark.trains
def test_resume_refuses_a_changed_model_shape_and_logs_harmless_changes(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=3", run_dir=run))
    with pytest.raises(ConfigError, match=r"(?s)model.dim: 128 -> 64.*resume_force=true"):
        train(tiny_config("train.max_steps=5", "model.dim=64", run_dir=run))
    train(tiny_config("train.max_steps=5", "optimizer.lr=5e-4", run_dir=run))
    changes = [e["change"] for e in events(run, "config_change")]
    assert "optimizer.lr: 0.003 -> 0.0005" in changes and "train.max_steps: 3 -> 5" in changes


@pytest.mark.trains
def test_pruning_never_deletes_the_last_good_checkpoint(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=12", "train.checkpoint_interval=5", "train.keep_checkpoints=2",
                      "stabilizer=[spike_guard]", "stabilizer.spike_guard.good_after_steps=8", run_dir=run))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000000", "step_00000010", "step_00000012"]  # step 0, good, outlives keep=2
    assert ckpt.is_good(run / "checkpoints" / "step_00000000")
    assert not any(ckpt.is_good(run / "checkpoints" / n) for n in names[1:])


@pytest.mark.trains
def test_a_checkpoint_becomes_good_after_enough_clean_steps(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=12", "train.checkpoint_interval=4", "stabilizer=[spike_guard]",
                      "stabilizer.spike_guard.good_after_steps=5", run_dir=run))
    kept = {p.name: ckpt.is_good(p) for p in (run / "checkpoints").iterdir()}
    # 4 became good at step 9; 8 and 12 were not yet followed by 5 clean steps; step 0 (good) was pruned
    # because a newer good one exists.
    assert kept == {"step_00000004": True, "step_00000008": False, "step_00000012": False}


def test_guard_needs_checkpoints_that_live_long_enough_to_become_good(tiny_config):
    with pytest.raises(ConfigError, match=r"train.keep_checkpoints=3 x train.checkpoint_interval=3 must exceed"):
        tiny_config("stabilizer=[spike_guard]")


# --- the rollback policy alone: plans from synthetic actions, no training ------------------------------------------


def policy(**changes):
    from llmstable.config import SpikeGuardConfig
    from llmstable.recovery import Rollback

    return Rollback(SpikeGuardConfig(**changes), global_batch_size=8)


def action(kind, lr_cut=False, moment_reset=False):
    from llmstable.stabilizers import Action

    return Action(kind, [], lr_cut=lr_cut, moment_reset=moment_reset)


def test_a_rollback_plan_returns_to_the_good_checkpoint_and_skips_what_was_read_since_plus_a_margin(tmp_path):
    from llmstable.recovery import Target

    rollback = policy(margin_steps=2)
    target = Target(tmp_path / "step_00000040", 40, 320)
    plan = rollback.plan(action("rollback"), consumed_until=400, target=target)
    assert (plan.kind, plan.target, plan.skip, plan.lr_factor, plan.reset_moments) == (
        "rollback", target, (320, 416), 1.0, False)
    rollback.carried_out(plan)
    ledger = rollback.ledger
    assert (ledger.spikes, ledger.rollbacks, ledger.skipped_samples, ledger.skip_ranges) == (1, 1, 96, [[320, 416]])
    # A second rollback to the same checkpoint merges the ranges; skipped_samples counts each range it skipped.
    plan = rollback.plan(action("rollback", lr_cut=True, moment_reset=True), consumed_until=432, target=target)
    assert plan.skip == (320, 448) and plan.lr_factor == 0.5 and plan.reset_moments
    rollback.carried_out(plan)
    assert ledger.skip_ranges == [[320, 448]] and ledger.lr_scale == 0.5 and ledger.skipped_samples == 96 + 128
    assert (ledger.rollbacks, ledger.lr_cuts, ledger.moment_resets) == (2, 1, 1)


def test_without_a_good_checkpoint_or_when_asked_the_plan_is_an_abort(tmp_path):
    from llmstable.recovery import Target

    rollback = policy()
    assert rollback.plan(action("rollback"), 100, None).kind == "abort"
    assert rollback.plan(action("abort"), 100, Target(tmp_path, 8, 64)).kind == "abort"
    assert rollback.ledger.spikes == 2 and rollback.ledger.rollbacks == 0


def test_checkpoints_become_good_after_enough_clean_steps_and_a_skip_forgets_the_pending_ones():
    rollback = policy(good_after_steps=5)
    rollback.saved(0, good=True)  # the initial weights: good from the start, never pending
    rollback.saved(10, good=False)
    assert rollback.step_done(14, skipped=False) == []
    assert rollback.step_done(15, skipped=False) == [10]
    rollback.saved(20, good=False)
    assert rollback.step_done(21, skipped=True) == [] and rollback.pending_good == []
    assert (rollback.ledger.spikes, rollback.ledger.skipped_steps) == (1, 1)


def test_resume_restores_the_books_and_a_rollback_keeps_them():
    from llmstable.recovery import Rollback

    rollback = policy()
    rollback.ledger.rollbacks, rollback.pending_good = 3, [30]
    saved = rollback.state_dict()
    resumed = Rollback(rollback.cfg, 8)
    resumed.load_state_dict(saved)
    assert resumed.ledger.rollbacks == 3 and resumed.pending_good == [30]
    rollback.ledger.rollbacks = 4
    rollback.load_state_dict({**saved, "pending_good": [10]}, keep_ledger=True)
    assert rollback.ledger.rollbacks == 4 and rollback.pending_good == [10]


def test_without_a_guard_every_checkpoint_is_good_at_once():
    from llmstable.recovery import Rollback

    rollback = Rollback(None, 8)
    rollback.saved(10, good=False)
    assert not rollback.guarded and rollback.pending_good == [] and rollback.step_done(100, skipped=False) == []
