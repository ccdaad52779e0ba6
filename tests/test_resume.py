"""One run per run directory, and what continues it: the resume choice over foreign, hand-made and unreadable
checkpoints, resume=never, config.yaml after a refused resume, messages on the console, and a full disk."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import TINY
from llmstable import checkpoint as ckpt
from llmstable.config import ConfigError
from llmstable.metrics import read_jsonl
from llmstable.resume import problem
from llmstable.trainer import train

F = ["train.max_steps=10", "train.checkpoint_interval=5", "train.eval_interval=5"]


def cli(*overrides, timeout=600):
    return subprocess.run([sys.executable, "-m", "llmstable.cli", "train", *TINY, *overrides],
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(run):
    out = {}
    for r in read_jsonl(run / "metrics.jsonl"):
        if "train/loss" in r:
            out[r["step"]] = (r["train/loss"], r["optim/grad_norm"])
    return out


def reseal(checkpoint):
    """Recompute the manifest after a hand edit (a foreign or hand-made checkpoint is self-consistent)."""
    import hashlib

    files = {str(p.relative_to(checkpoint)): {"bytes": p.stat().st_size,
                                                "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name not in ckpt.UNLISTED}
    step = ckpt.content_step(checkpoint) if checkpoint.name.startswith(ckpt.PREFIX) else 0  # the step it holds
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps({"step": step, "files": files}))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 10-step run with checkpoints at 5 and 10 (read-only: tests copy it)."""
    from llmstable.compose import compose_config

    run = tmp_path_factory.mktemp("resume") / "run"
    train(compose_config([*TINY, *F], run_dir=run))
    return run


def copy(finished, tmp_path, name="run"):
    shutil.copytree(finished, tmp_path / name)
    return tmp_path / name


@pytest.mark.trains
@pytest.mark.subprocess
def test_resume_never_is_refused_in_a_run_dir_that_holds_a_run(finished, tmp_path, tiny_config):
    run = copy(finished, tmp_path)
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"resume=never, but run_dir=.* already holds a run .*run_dir_overwrite=true"):
        train(tiny_config(*F, "resume=never", run_dir=run))
    done = cli(*F, "resume=never", f"run_dir={run}")
    assert done.returncode == 2 and "run_dir_overwrite=true" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(run) == before  # refused before Hydra or the trainer wrote anything


@pytest.mark.slow
@pytest.mark.trains
@pytest.mark.subprocess
def test_starting_over_never_mixes_two_runs(finished, tmp_path):
    """The reported case: a new run with resume=never in an old run's directory, killed at step 8, then resumed by
    a plain rerun, continues the *new* run (the old run's steps 10 outranked and pruned its checkpoints)."""
    run = copy(finished, tmp_path)
    old = snapshot(run)
    killed = cli(*F, "resume=never", "run_dir_overwrite=true", "optimizer.lr=1e-3", "fault.kill_at_step=8",
                 f"run_dir={run}")
    assert killed.returncode == -9, killed.stderr[-2000:]
    (aside,) = tmp_path.glob("run.replaced-*")
    assert {k: v for k, v in snapshot(aside).items() if not k.startswith(".hydra")} == {
        k: v for k, v in old.items() if not k.startswith(".hydra")}  # the old run, whole, nothing deleted
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000005"]
    resumed = cli(*F, "optimizer.lr=1e-3", f"run_dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 5 and summary["steps"] == 10
    reference = tmp_path / "reference"
    assert cli(*F, "optimizer.lr=1e-3", f"run_dir={reference}").returncode == 0
    assert rows(run) == rows(reference)


@pytest.mark.trains
def test_garbage_state_with_a_matching_manifest_is_skipped_with_a_named_warning(finished, tmp_path, tiny_config,
                                                                                caplog):
    run = copy(finished, tmp_path)
    newest = run / "checkpoints" / "step_00000010"
    (newest / "state.json").write_text("{not json")
    reseal(newest)
    summary = train(tiny_config(*F[1:], "train.max_steps=12", run_dir=run))
    assert summary["resumed_from_step"] == 5 and summary["steps"] == 12
    assert any("step_00000010" in r.message and "state.json" in r.message for r in caplog.records)


@pytest.mark.parametrize("damage", ["empty_manifest", "unlisted_file", "no_config", "wrong_state"])
@pytest.mark.trains
def test_every_kind_of_unreadable_checkpoint_is_named(finished, tmp_path, damage):
    run = copy(finished, tmp_path)
    checkpoint = run / "checkpoints" / "step_00000010"
    if damage == "empty_manifest":
        (checkpoint / ckpt.MANIFEST).write_text("{}")
        expected = "manifest.json lists no files"
    elif damage == "unlisted_file":
        (checkpoint / "extra.pt").write_bytes(b"planted")
        expected = "extra.pt is not listed in"
    elif damage == "no_config":
        (checkpoint / "config.yaml").unlink()
        reseal(checkpoint)
        expected = "config.yaml is not listed in"
    else:
        (checkpoint / "state.json").write_text(json.dumps({"step": 10}))
        reseal(checkpoint)
        expected = "state.json lacks"
    assert expected in problem(checkpoint)


@pytest.mark.trains
@pytest.mark.subprocess
def test_when_every_checkpoint_is_unreadable_the_run_is_refused_with_a_list(finished, tmp_path, tiny_config):
    run = copy(finished, tmp_path)
    for checkpoint in ckpt.list_checkpoints(run / "checkpoints"):
        (checkpoint / "state.json").write_text("garbage")
        reseal(checkpoint)
    before = snapshot(run)
    with pytest.raises(ckpt.CheckpointError) as err:
        train(tiny_config(*F, run_dir=run))
    message = str(err.value)
    assert "every checkpoint" in message and "step_00000005: " in message and "step_00000010: " in message
    assert "resume=never" in message
    assert snapshot(run) == before  # nothing was overwritten
    done = cli(*F, f"run_dir={run}")
    assert done.returncode == 2 and "every checkpoint" in done.stderr and "Traceback" not in done.stderr
    summary = train(tiny_config(*F, "resume=never", run_dir=run))  # the documented way to start over
    assert summary["resumed_from_step"] is None and summary["steps"] == 10
    (aside,) = tmp_path.glob("run.replaced-*")
    assert snapshot(aside) == before


@pytest.mark.trains
@pytest.mark.subprocess
def test_an_explicit_resume_path_gets_a_named_error(finished, tmp_path, tiny_config):
    run = copy(finished, tmp_path)
    handmade = tmp_path / "handmade"
    handmade.mkdir()
    (handmade / "state.json").write_text(json.dumps({"step": 3}))
    reseal(handmade)
    with pytest.raises(ckpt.CheckpointError, match=r"resume=.*handmade.* cannot be used: .*(rng.pt|config.yaml)"):
        train(tiny_config(*F, f"resume={handmade}", run_dir=run))
    done = cli(*F, f"resume={handmade}", f"run_dir={run}")
    assert done.returncode == 2 and "handmade" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.trains
def test_a_refused_resume_leaves_the_run_as_it_was(finished, tmp_path, tiny_config):
    """Refused before anything is written: config.yaml, the logs (a torn last line is not repaired yet), train.log,
    the tokenizer, the lock."""
    run = copy(finished, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "tok')  # a crash mid-write: a resume would cut it, a refused one must not
    shutil.rmtree(run / "tokenizer")
    before = snapshot(run)
    with pytest.raises(ConfigError, match="model.dim: 128 -> 64"):
        train(tiny_config(*F, "train.max_steps=12", "model.dim=64", run_dir=run))
    assert snapshot(run) == before and sorted(p.name for p in run.iterdir()) == sorted(
        p.name for p in finished.iterdir() if p.name != "tokenizer")


@pytest.mark.trains
@pytest.mark.subprocess
def test_moving_an_old_run_aside_keeps_the_lock_held(finished, tmp_path, tiny_config):
    """POSIX drops a process's lock at any close of the file: moving the old run aside must not open it again."""
    from llmstable.parallel.world import World
    from llmstable.resume import RunDirectory
    from llmstable.rundir import LOCK

    run = copy(finished, tmp_path)
    directory = RunDirectory(tiny_config(*F, "resume=never", "run_dir_overwrite=true", run_dir=run), World())
    assert directory.claim().resume_from is None
    (aside,) = tmp_path.glob("run.replaced-*")
    assert (aside / LOCK).read_bytes() == (finished / LOCK).read_bytes()  # the old run keeps its copy
    code = ("import sys; from pathlib import Path; from llmstable.rundir import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire()")
    other = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True)
    assert other.returncode != 0 and "is in use by process" in other.stderr, other.stderr[-2000:]
    directory.close()
    assert subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True).returncode == 0


@pytest.mark.trains
@pytest.mark.subprocess
def test_a_harmless_change_on_resume_is_printed_and_logged(finished, tmp_path):
    run = copy(finished, tmp_path)
    done = cli(*F[1:], "train.max_steps=11", "optimizer.lr=1e-3", f"run_dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "with a changed config: optimizer.lr: 0.003 -> 0.001" in done.stdout + done.stderr
    assert "optimizer.lr: 0.003 -> 0.001" in (run / "train.log").read_text()


@pytest.mark.trains
@pytest.mark.subprocess
def test_a_full_disk_names_the_path_and_keeps_the_last_checkpoint(tmp_path, tiny_config):
    run = tmp_path / "run"
    done = cli(*F, "fault.disk_full_at_step=10", f"run_dir={run}")
    assert done.returncode == 5, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "No space left on device" in done.stderr
    assert "step_00000010" in done.stderr and "bytes are free" in done.stderr and "took" in done.stderr
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]  # no half checkpoint
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000005"]
    assert ckpt.verify(run / "checkpoints" / "step_00000005") is None
    summary = train(tiny_config(*F, run_dir=run))  # space freed: the same command resumes
    assert summary["resumed_from_step"] == 5 and summary["steps"] == 10
    reference = tmp_path / "reference"
    train(tiny_config(*F, run_dir=reference))
    assert rows(run) == rows(reference)


@pytest.mark.parametrize("writer", ["write_snapshot", "save"])  # in the background (the default), in the loop
@pytest.mark.trains
def test_a_save_that_fails_any_other_way_removes_its_partial_write(tmp_path, tiny_config, monkeypatch, writer):
    from llmstable.parallel.engines import Engine

    def broken(self, directory, *snapshot):
        (directory / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(Engine, writer, broken)
    background = [] if writer == "write_snapshot" else ["train.checkpoint_async=false"]
    with pytest.raises(ckpt.CheckpointWriteError, match=r"step_00000005: RuntimeError\('basic_ios::clear"):
        train(tiny_config(*F, *background, run_dir=tmp_path / "run"))
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.trains
def test_a_save_that_will_not_fit_is_warned_about_before_the_step(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setattr(ckpt, "free_bytes", lambda directory: 1000)
    run = tmp_path / "run"
    train(tiny_config(*F, run_dir=run))
    warnings = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "disk_warning"]
    assert [w["step"] for w in warnings] == [10]  # before the second save: the first one gave the size
    assert "1,000 bytes free" in warnings[0]["message"]
