"""The silent-data-corruption replay: a transient fault (one forward pass with one block's activations corrupted)
is told apart from a data spike. The fault is replayed away and logged as `sdc_suspect` with no data skipped; a
batch of random tokens reproduces bit for bit and is rolled back and skipped as before; too many suspects stop the
run with a message to check the machine."""

import pytest

from llmstable.metrics import read_jsonl
from llmstable.report.spikes import format_table, spike_rows
from llmstable.stabilizers.hooks import SuspectedHardwareFault
from llmstable.stabilizers.sdc import SDCReplay
from llmstable.trainer import train

GUARD = ["stabilizer=[spike_guard]", "stabilizer.spike_guard.min_history=3", "stabilizer.spike_guard.window=6",
         "stabilizer.spike_guard.k_std=2", "stabilizer.spike_guard.good_after_steps=2",
         "stabilizer.spike_guard.skip_steps=0", "stabilizer.spike_guard.watch=[loss]",
         "stabilizer.spike_guard.replay=true", "stabilizer.spike_guard.max_sdc=2", "train.max_steps=12",
         "train.checkpoint_interval=4", "train.keep_checkpoints=3"]


@pytest.mark.slow
@pytest.mark.trains
def test_the_replay_tells_a_transient_fault_from_a_data_spike(tiny_config, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config(*GUARD, "fault.sdc_at_step=9", "fault.corrupt_batch_steps=[11]", run_dir=run))
    events = read_jsonl(run / "events.jsonl")
    suspects = [e for e in events if e["event"] == "sdc_suspect"]
    assert [(e["step"], e["action"]) for e in suspects] == [(9, "continue")]
    assert suspects[0]["first"]["loss"] > suspects[0]["replayed"]["loss"] + 0.3  # the corrupted pass, then clean
    spikes = [e for e in events if e["event"] == "spike"]
    assert [e["step"] for e in spikes] == [11]  # the fault's step is no spike: it went on with the replayed result
    assert [(e["step"], e["to_step"]) for e in events if e["event"] == "rollback"] == [(11, 8)]
    skips = [e for e in events if e["event"] == "skip_data"]
    assert len(skips) == 1 and skips[0]["step"] == 11  # data skipped for the data spike only
    assert summary["rollbacks"] == 1 and summary["skipped_steps"] == 0
    rows = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r}
    assert rows[12]["stab/spike/sdc_suspects"] == 1
    table = format_table(spike_rows(events))
    assert "sdc_suspect (continue)" in table and "rollback" in table


def test_replays_that_keep_differing_stop_the_run_with_a_message_to_check_the_machine():
    sdc = SDCReplay(max_sdc=2)
    assert sdc.compare(5, {"loss": 3.0}, {"loss": 3.0}) is None  # reproduced: a real spike
    assert sdc.compare(6, {"loss": 9.0}, {"loss": 3.0})["suspects"] == 1
    with pytest.raises(SuspectedHardwareFault, match="Check the machine"):
        sdc.compare(7, {"loss": 9.0}, {"loss": 3.1})
    later = SDCReplay(max_sdc=2)
    later.load_state_dict({"suspects": 1})
    later.suspects = 1
    later.load_state_dict({"suspects": 0})  # a rollback restores an older count: suspects never go back
    assert later.suspects == 1


@pytest.mark.slow
@pytest.mark.subprocess
def test_llmstable_train_exits_4_at_max_sdc_suspects_and_says_to_check_the_machine(tmp_path):
    import subprocess
    import sys

    from tests.conftest import TINY

    guard = [o for o in GUARD if "max_sdc" not in o and "max_steps" not in o]
    result = subprocess.run(
        [sys.executable, "-m", "llmstable.cli", "train", *TINY, *guard, "train.max_steps=10",
         "stabilizer.spike_guard.max_sdc=1", "fault.sdc_at_step=9", f"run_dir={tmp_path}/run"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 4, result.stderr[-2000:]
    assert "suspected hardware fault" in result.stderr and "Check the machine" in result.stderr
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    assert [(e["step"], e["action"]) for e in events if e["event"] == "sdc_suspect"] == [(9, "stop")]
