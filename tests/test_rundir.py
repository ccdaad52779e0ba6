"""Whose directory is it (llmstable.rundir): one run per run directory, enforced by a lock that every later start
meets; no run in a directory of other files; a file or an unwritable place as run_dir; and `prepare` keeping out of
folders it did not make. Real processes, real locks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY
from llmstable.config import ConfigError
from llmstable.metrics import read_jsonl
from llmstable.rundir import LOCK, RunLock, ownership_problem
from llmstable.trainer import train


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "llmstable.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def wait_for_step(run, step, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and any(r.get("step", 0) >= step for r in read_jsonl(run / "metrics.jsonl")):
            return
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {run} after {timeout} s")


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder_and_the_first_is_unharmed(tmp_path):
    run = tmp_path / "run"
    first = cli("train", *TINY, "train.max_steps=60", "train.eval_interval=30", "train.checkpoint_interval=30",
                f"run_dir={run}")
    wait_for_step(run, 2, first)
    second = cli("train", *TINY, "train.max_steps=60", "optimizer.lr=1e-2", "train.seed=7", f"run_dir={run}")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2, err[-2000:]
    assert f"is in use by process {first.pid}" in err and "Traceback" not in err
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1[-2000:]
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 61))  # one run's rows, each step once
    assert "seed: 0" in (run / "config.yaml").read_text()  # the first run's config, not the refused one's


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_message(tmp_path):
    run = tmp_path / "run"
    killed = cli("train", *TINY, "train.max_steps=40", f"run_dir={run}")
    wait_for_step(run, 2, killed)
    holder = json.loads((run / LOCK).read_text())
    assert holder["pid"] == killed.pid
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    again = cli("train", *TINY, "train.max_steps=40", f"run_dir={run}")
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert f"took over the lock of process {killed.pid}" in err


@pytest.mark.subprocess
def test_the_lock_is_reentrant_in_a_process_and_exclusive_between_processes(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    again = RunLock(tmp_path / "run").acquire()  # the CLI took it before Hydra; train() takes it again
    again.release()
    code = ("import sys; from pathlib import Path; from llmstable.rundir import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire()")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True)
    assert other.returncode != 0 and "is in use by" in other.stderr
    first.release()
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")]).returncode == 0


@pytest.mark.trains
@pytest.mark.subprocess
def test_train_refuses_a_directory_that_is_not_a_run_and_changes_nothing_in_it(tmp_path, tiny_config):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    (mine / "summary.json").write_text('{"mine": true}')
    (mine / ".email.tmpl").write_text("hello")
    before = snapshot(mine)
    with pytest.raises(ConfigError, match=r"is not empty and holds no llmstable run \(\.email\.tmpl, config\.yaml"):
        train(tiny_config(run_dir=mine))
    result = subprocess.run([sys.executable, "-m", "llmstable.cli", "train", *TINY, f"run_dir={mine}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "run_dir_overwrite=true" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == sorted(before)  # nothing new
    summary = train(tiny_config("resume=never", "run_dir_overwrite=true", run_dir=mine))
    assert summary["steps"] == 6
    (aside,) = tmp_path.glob("mine.replaced-*")
    assert snapshot(aside) == before  # moved aside whole


def test_a_run_dir_that_is_a_file_or_unwritable_is_a_named_error(tmp_path, tiny_config):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"run_dir=.*file' is an existing file, not a directory"):
        train(tiny_config(run_dir=a_file))
    assert a_file.read_text() == "x"
    if os.geteuid() == 0:
        pytest.skip("root writes through file permissions: the unwritable case needs another user")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"run_dir=.* cannot be written .*not writable"):
            train(tiny_config(run_dir=locked / "run"))
    finally:
        locked.chmod(0o755)


def test_a_read_only_mount_is_a_named_error(tmp_path, tiny_config):
    """On a read-only mount, whoever the user is (root included)."""
    mounts = [line.split() for line in open("/proc/mounts")]
    read_only = next((m[1] for m in mounts if "ro" in m[3].split(",") and os.path.isdir(m[1])
                      and m[1] not in ("/", "/proc", "/dev") and not m[1].startswith(("/proc/", "/dev/"))), None)
    if read_only is None:
        pytest.skip("no read-only mount on this machine")
    with pytest.raises(ConfigError, match=r"cannot be written .*read-only file system"):
        train(tiny_config(run_dir=os.path.join(read_only, "llmstable-run")))


def test_hidden_files_and_hydra_files_of_this_launch_do_not_make_a_run(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    assert ownership_problem(d, overwrite=False) is None  # empty: ours to use
    (d / LOCK).write_text("")
    assert ownership_problem(d, overwrite=False) is None  # only the lock (written first)
    (d / ".hydra").mkdir()
    (d / ".hydra" / "config.yaml").write_text("".join(f"{k}: {{}}\n" for k in ("model", "data", "optimizer",
                                                                              "schedule", "train")))
    assert ownership_problem(d, overwrite=False) is None  # an earlier start of a run
    (d / "notes.txt").write_text("mine")
    (d / "events.jsonl").write_text("my own events\n")  # a user's file of that name is no run
    problem = ownership_problem(d, overwrite=False, ignore={".hydra"})  # .hydra of this very launch: no earlier run
    assert "holds no llmstable run (events.jsonl, notes.txt)" in problem
    assert ownership_problem(d, overwrite=True, ignore={".hydra"}) is None


@pytest.mark.trains
def test_another_programs_files_of_the_same_names_make_no_run(tmp_path, tiny_config):
    """Another trainer's metrics.jsonl and step_1000.pt, a Hydra app's .hydra, a log of other events: refused,
    untouched; the same names as llmstable writes them make a run."""
    other = tmp_path / "other"
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "config.yaml").write_text("lr: 0.1\nmodel: resnet50\n")
    (other / "checkpoints").mkdir()
    (other / "checkpoints" / "step_1000.pt").write_bytes(b"weights")
    (other / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    (other / "events.jsonl").write_text('{"event": "epoch", "step": 1}\n')
    (other / "summary.json").write_text('{"theirs": true}')
    before = snapshot(other)
    with pytest.raises(ConfigError, match=r"holds no llmstable run \(\.hydra, checkpoints, events\.jsonl"):
        train(tiny_config(run_dir=other))
    assert snapshot(other) == before and not (other / LOCK).exists()
    ours = tmp_path / "ours"
    train(tiny_config("train.max_steps=1", run_dir=ours))
    for marker in ("metrics.jsonl", "events.jsonl", "checkpoints"):
        d = tmp_path / f"only-{marker}"
        d.mkdir()
        (d / "notes.txt").write_text("mine")
        (shutil.copytree if marker == "checkpoints" else shutil.copy)(ours / marker, d / marker)
        assert ownership_problem(d, overwrite=False) is None, marker


@pytest.mark.trains
def test_a_start_killed_before_its_first_log_line_is_still_a_run_and_is_resumed(tmp_path, tiny_config):
    """What a kill -9 during start-up leaves (the lock naming the dead process, empty logs, train.log, the
    tokenizer): the rerun takes the place over instead of calling it a folder of other files."""
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    (run / LOCK).write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "started": "2026-12-05 00:00:00",
                                        "command": "llmstable train"}))
    for name in ("metrics.jsonl", "events.jsonl", "train.log"):
        (run / name).write_text("")
    assert ownership_problem(run, overwrite=False) is None
    assert train(tiny_config("train.max_steps=2", run_dir=run))["steps"] == 2
    (run / LOCK).write_text('{"my": "lock"}')  # a lock file of another program's is not one
    (run / "events.jsonl").write_text("")
    (run / "metrics.jsonl").write_text("")
    shutil.rmtree(run / "checkpoints")
    assert "holds no llmstable run" in ownership_problem(run, overwrite=False)


def test_a_refused_start_leaves_no_directory_or_lock_behind(tmp_path, tiny_config):
    new = tmp_path / "new"
    with pytest.raises(ConfigError, match="is not a checkpoint directory"):
        train(tiny_config(f"resume={tmp_path / 'typo'}", run_dir=new))
    assert not new.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="is not a checkpoint directory"):
        train(tiny_config(f"resume={tmp_path / 'typo'}", run_dir=empty))
    assert list(empty.iterdir()) == []


@pytest.mark.subprocess
def test_prepare_refuses_a_folder_it_did_not_make_and_deletes_nothing(tmp_path, text_corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".email.tmpl").write_text("keep me")
    (out / ".build.tmp").mkdir()
    (out / ".build.tmp" / "x").write_text("keep me too")
    (out / "tokenizer").mkdir()
    before = snapshot(out)
    result = subprocess.run([sys.executable, "-m", "llmstable.cli", "prepare", "data=local_files",
                             f"data.path={text_corpus}/*.txt", f"out={out}"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "is not empty and holds no prepared corpus" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(out) == before and not (out / "progress.json").exists() and not (out / ".lock").exists()


def test_a_users_manifest_or_progress_file_does_not_make_a_prepared_corpus(tmp_path):
    from llmstable.data.prepare import check_output_dir
    from llmstable.data.corpus import DataError

    out = tmp_path / "project"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my project", "version": 1}')
    (out / "progress.json").write_text("50%")
    (out / ".lock").write_text("my own lock file")
    before = snapshot(out)
    with pytest.raises(DataError, match=r"holds no prepared corpus \(\.lock, manifest\.json, progress\.json\)"):
        check_output_dir(out)
    assert snapshot(out) == before
