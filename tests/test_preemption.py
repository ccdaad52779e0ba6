"""Stopping on a signal without losing work (llmstable.preemption): SIGTERM, SIGUSR1 and Ctrl-C write a checkpoint and
exit 75, in training and in evaluation, on one process and on 2 gloo ranks, and the resumed run equals the
uninterrupted one bit for bit. Real signals: sent by the process itself at a chosen point (fault.signal_*) or from
outside at an arbitrary moment."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from llmstable import checkpoint as ckpt
from llmstable.compose import compose_config
from llmstable.metrics import read_jsonl
from llmstable.resume import problem
from llmstable.trainer import train

COMMON = ["train.max_steps=10", "train.checkpoint_interval=5", "train.eval_interval=3"]


def rows(run):
    """The last metrics row per (step, kind): after a resume, replayed steps are logged again."""
    out = {}
    for r in read_jsonl(run / "metrics.jsonl"):
        kind = "train" if "train/loss" in r else "val"
        out[(r["step"], kind)] = {k: v for k, v in r.items() if not k.startswith("perf/")}
    return out


def events(run, kind):
    return [e for e in read_jsonl(run / "events.jsonl") if e["event"] == kind]


def cli(*overrides, run, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "llmstable.cli", "train", *TINY, *overrides, f"run_dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    train(compose_config([*TINY, *COMMON], run_dir=run))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("fault, stopped_at", [("fault.signal_at_step=4", 5),  # seen at step 5's all-reduce
                                               ("fault.signal_in_eval_at_step=6", 6),  # between eval batches
                                               ("fault.signal=SIGUSR1 fault.signal_at_step=7", 8)])
@pytest.mark.trains
def test_a_signal_in_training_or_evaluation_checkpoints_stops_and_the_resume_is_bit_identical(
        reference, tmp_path, tiny_config, fault, stopped_at):
    """In process (the command's exit code 75 is checked by the tests below): the signal is real, sent by the
    process to itself at the chosen point and handled by the run's handler."""
    from llmstable.preemption import Preempted

    run = tmp_path / "run"
    with pytest.raises(Preempted, match=rf"at step {stopped_at}: checkpoint .* run the same command again"):
        train(tiny_config(*COMMON, *fault.split(), run_dir=run))
    (preempted,) = events(run, "preempted")
    assert preempted["step"] == stopped_at and preempted["eval_pending"] == ("in_eval" in fault)
    assert (run / "checkpoints" / f"step_{stopped_at:08d}" / "manifest.json").is_file()
    assert not (run / "summary.json").exists()  # not finished
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone with it
    summary = train(tiny_config(*COMMON, *fault.split(), run_dir=run))  # the same again: the fault fired once
    assert summary["steps"] == 10 and summary["resumed_from_step"] == stopped_at
    assert rows(run) == rows(reference)


@pytest.mark.slow
@pytest.mark.trains
@pytest.mark.subprocess
def test_sigterm_from_outside_at_an_arbitrary_moment_then_resume_equals_the_uninterrupted_run(tmp_path):
    common = ["train.max_steps=60", "train.checkpoint_interval=20", "train.eval_interval=7"]
    train_reference = tmp_path / "reference"
    train(compose_config([*TINY, *common], run_dir=train_reference))
    run = tmp_path / "run"
    process = cli(*common, run=run)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and len(read_jsonl(run / "metrics.jsonl")) >= 5):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    again = cli(*common, run=run)
    assert again.wait(timeout=600) == 0
    assert rows(run) == rows(train_reference)


@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_checkpoints_and_a_second_ctrl_c_stops_at_once(tmp_path):
    for presses, code in ((1, 75), (2, 130)):
        run = tmp_path / f"run{presses}"
        slow = ["model=tiny_10m"] if presses == 2 else []  # a stop that takes long enough to press twice
        process = cli("train.max_steps=2000", "train.checkpoint_interval=1000", *slow, run=run)
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").exists() and len(read_jsonl(run / "metrics.jsonl")) >= 3):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        for _ in range(presses):
            process.send_signal(signal.SIGINT)
            time.sleep(0.1)  # (two signals sent at once would reach Python's handler once)
        _, err = process.communicate(timeout=600)
        assert process.returncode == code, err[-3000:]
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
        if presses == 1:
            assert "SIGINT received" in err and len(events(run, "preempted")) == 1
        else:
            assert "interrupted again: stopping now" in err and not events(run, "preempted")


@pytest.mark.slow
@pytest.mark.parametrize("case, fault", [
    ("train", ["fault.rank=1", "fault.signal_at_step=2"]),
    pytest.param("eval", ["fault.rank=0", "fault.signal_in_eval_at_step=3"], marks=pytest.mark.long)])
@pytest.mark.subprocess
def test_two_ranks_stop_together_when_one_gets_the_signal_and_resume_exactly(tmp_path, case, fault):
    from torch.multiprocessing import ProcessRaisedException

    from tests.parallel.launch import run_ranks

    ddp = [*TINY, *COMMON, "distributed=ddp"]
    run_ranks(2, ddp, tmp_path / "reference")
    run = tmp_path / case
    with pytest.raises(ProcessRaisedException, match="Preempted"):
        run_ranks(2, [*ddp, *fault], run)
    (preempted,) = events(run, "preempted")
    assert preempted["step"] == 3  # both ranks: one all-reduce (training) or one eval batch (eval) after it
    run_ranks(2, [*ddp, *fault], run)
    assert rows(run) == rows(tmp_path / "reference")


@pytest.mark.trains
def test_a_signal_during_start_up_stops_the_command_at_its_first_step_with_exit_75(reference, tmp_path,
                                                                                 monkeypatch):
    """SIGTERM while the command composes its config (before the run exists): the command's flag, installed first
    thing, holds it; the run stops at step 1's boundary with a checkpoint, and the rerun matches the reference."""
    import llmstable.compose
    from llmstable.cli.train import train_command

    compose = llmstable.compose.compose_config

    def compose_and_get_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return compose(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(llmstable.compose, "compose_config", compose_and_get_signalled)
    assert train_command([*TINY, *COMMON, f"run_dir={run}"]) == 75
    assert [e["step"] for e in events(run, "preempted")] == [1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handlers are gone with it
    monkeypatch.setattr(llmstable.compose, "compose_config", compose)
    assert train_command([*TINY, *COMMON, f"run_dir={run}"]) == 0
    assert rows(run) == rows(reference)


@pytest.mark.slow
@pytest.mark.subprocess
def test_no_rank_exits_before_rank_0_has_written_the_preemption_checkpoint(tmp_path):
    """A launcher tears the job down at the first rank's exit (SIGTERM, then SIGKILL after a grace period: 30 s
    under torchrun, less than a large model's write): rank 1 (signalled) must wait for rank 0's background write,
    here 3 s slower than the grace period of 0.5 s, or the checkpoint is lost with rank 0."""
    from torch.multiprocessing import ProcessRaisedException

    from tests.parallel.launch import run_ranks

    run = tmp_path / "run"
    with pytest.raises(ProcessRaisedException, match="Preempted"):
        run_ranks(2, [*TINY, *COMMON, "distributed=ddp", "fault.rank=1", "fault.signal_at_step=2"], run,
                  slow_checkpoint_s=3.0, grace_s=0.5)
    (preempted,) = events(run, "preempted")
    assert preempted["step"] == 3 and Path(preempted["checkpoint"]).name == "step_00000003"
    assert ckpt.list_checkpoints(run / "checkpoints")[0].name == "step_00000003"
    assert problem(run / "checkpoints" / "step_00000003") is None


@pytest.mark.trains
def test_a_partial_last_line_is_cut_before_a_resume_appends(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run_dir=run))
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 7, "train/lo')  # a crash in the middle of a write
    with open(run / "events.jsonl", "ab") as f:
        f.write(b'{"event": "chec')
    train(tiny_config("train.max_steps=8", run_dir=run))
    import json

    for name in ("metrics.jsonl", "events.jsonl"):
        lines = (run / name).read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # every line whole
    repaired = events(run, "log_repaired")
    assert {e["file"]: e["bytes_cut"] for e in repaired} == {"metrics.jsonl": 21, "events.jsonl": 15}
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r] == list(range(1, 9))
