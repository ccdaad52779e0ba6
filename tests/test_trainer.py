"""End to end on the default corpus: the loss falls, the run directory contract is written, resume is exact."""

import json

import pytest

from llmstable.metrics import read_jsonl
from llmstable.trainer import train

LOSS_KEYS = ("train/loss", "optim/lr", "optim/grad_norm")


@pytest.mark.slow
@pytest.mark.trains
def test_tiny_run_on_sotu_lowers_val_loss_and_writes_the_run_directory(tiny_config, tmp_path):
    cfg = tiny_config("train.max_steps=60", "train.eval_interval=30", "train.checkpoint_interval=30",
                      "optimizer.lr=3e-3", "train.plot=true", run_dir=tmp_path / "run")
    summary = train(cfg)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "events.jsonl", "summary.json", "loss.png", "tokenizer"):
        assert (run / name).exists(), name
    assert json.loads((run / "summary.json").read_text()) == summary
    for key in ("steps", "tokens", "final_val_loss", "wall_s", "tokens_per_sec"):
        assert key in summary
    assert summary["steps"] == 60 and summary["tokens"] == 60 * 8 * 32
    rows = read_jsonl(run / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 61))
    for key in ("step", "tokens", "train/loss", "optim/lr", "optim/grad_norm", "perf/tokens_per_sec"):
        assert key in train_rows[0]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(val) == 2 and val[-1] == summary["final_val_loss"]
    first_loss = train_rows[0]["train/loss"]
    assert first_loss > 6.0  # ln(512) = 6.24 at init
    assert summary["final_val_loss"] < first_loss - 0.75  # about 6.26 -> 5.3 in 60 steps
    events = [e["event"] for e in read_jsonl(run / "events.jsonl")]
    assert events[0] == "start" and events.count("checkpoint") == 2 and events[-1] == "end"
    assert all("step" in e for e in read_jsonl(run / "events.jsonl"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000030", "step_00000060"]


def rows_by_step(run_dir):
    return {r["step"]: tuple(r[k] for k in LOSS_KEYS) for r in read_jsonl(run_dir / "metrics.jsonl")
            if "train/loss" in r}


@pytest.mark.slow
@pytest.mark.trains
def test_resume_from_a_checkpoint_matches_the_uninterrupted_run_bit_for_bit(tiny_config, tmp_path):
    full = tiny_config("train.max_steps=8", "train.checkpoint_interval=3", run_dir=tmp_path / "full")
    train(full)
    # The same run stopped after 5 steps (last checkpoint at step 3), then resumed with the full budget.
    part = tiny_config("train.max_steps=5", "train.checkpoint_interval=3", run_dir=tmp_path / "part")
    train(part)
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_00000005")
    resumed = tiny_config("train.max_steps=8", "train.checkpoint_interval=3", run_dir=tmp_path / "part")
    summary = train(resumed)
    assert summary["resumed_from_step"] == 3
    want, got = rows_by_step(tmp_path / "full"), rows_by_step(tmp_path / "part")
    for step in range(4, 9):
        assert got[step] == want[step], step  # exact equality, not a tolerance
    events = read_jsonl(tmp_path / "part" / "events.jsonl")
    assert any(e["event"] == "resume" and e["step"] == 3 for e in events)


@pytest.mark.trains
def test_resume_never_starts_over_after_moving_the_earlier_run_aside(tiny_config, tmp_path):
    train(tiny_config("train.max_steps=3", run_dir=tmp_path / "r"))
    summary = train(tiny_config("train.max_steps=3", "resume=never", "run_dir_overwrite=true", run_dir=tmp_path / "r"))
    assert summary["resumed_from_step"] is None and summary["steps"] == 3
    (aside,) = tmp_path.glob("r.replaced-*")
    assert (aside / "checkpoints" / "step_00000003").is_dir() and (aside / "metrics.jsonl").is_file()


@pytest.mark.trains
def test_grad_accumulation_matches_one_big_batch(tiny_config, tmp_path):
    """global 8 as 2 x 4 and as 1 x 8 see the same samples and take the same first step (up to fp32 sums)."""
    a = train(tiny_config("train.max_steps=2", "train.micro_batch_size=4", run_dir=tmp_path / "a"))
    b = train(tiny_config("train.max_steps=2", "train.micro_batch_size=8", run_dir=tmp_path / "b"))
    ra, rb = rows_by_step(tmp_path / "a"), rows_by_step(tmp_path / "b")
    for step in (1, 2):
        assert ra[step][0] == pytest.approx(rb[step][0], rel=1e-5)
    assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=1e-4)
