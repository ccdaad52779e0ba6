"""The `llmstable` command as users run it: real subprocesses."""

import json
import os
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmstable.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.subprocess
def test_unknown_key_on_the_command_line_exits_2_listing_valid_keys(tmp_path):
    result = run("train", "train.batch_size=4", f"run_dir={tmp_path}")
    assert result.returncode == 2
    assert "train.batch_size" in result.stderr and "global_batch_size" in result.stderr


@pytest.mark.subprocess
def test_bad_value_exits_2_naming_the_key(tmp_path):
    result = run("train", "model.n_heads=3", f"run_dir={tmp_path}")
    assert result.returncode == 2
    assert "model.dim=128 is not divisible by model.n_heads=3" in result.stderr


@pytest.mark.subprocess
def test_missing_data_path_names_the_file(tmp_path):
    result = run("train", "data=local_files", f"data.path={tmp_path}/none/*.txt", f"run_dir={tmp_path}/run")
    assert result.returncode == 2
    assert "none/*.txt" in result.stderr and "matches no file" in result.stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_train_then_generate_then_export_from_the_command_line(tmp_path):
    from conftest import TINY

    result = run("train", *TINY, "train.max_steps=4", "train.sample_tokens=10", f"run_dir={tmp_path}/run",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--- sample after 4 steps ---" in result.stdout
    assert (tmp_path / "run" / "summary.json").exists()
    gen = run("generate", str(tmp_path / "run"), "--prompt", "Fellow citizens", "--max-new-tokens", "5")
    assert gen.returncode == 0 and gen.stdout.startswith("Fellow citizens")
    exp = run("export", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert exp.returncode == 0 and (tmp_path / "hf" / "config.json").exists()
    again = run("export", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert again.returncode == 2 and "already holds an export: pass --overwrite" in again.stderr


@pytest.mark.subprocess
def test_prepare_and_spikes_start_without_torch():
    # `llmstable prepare` spends its first seconds importing; torch (2-3 s) is not needed until training, and
    # `llmstable spikes` only reads JSON. A lazy package import that turns eager again fails here.
    code = ("import sys, llmstable.cli, llmstable.compose, llmstable.data.prepare, llmstable.report.spikes; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.subprocess
def test_deepspeed_started_as_a_plain_command_trains_as_a_world_of_one(tmp_path):
    """No launcher: nothing sets RANK, LOCAL_RANK or MASTER_ADDR, which DeepSpeed asserts on. llmstable sets them
    for its world of one (never over a launcher's) and the run trains."""
    from conftest import TINY

    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LLMSTABLE_INIT_METHOD")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    result = subprocess.run([sys.executable, "-m", "llmstable.cli", "train", *TINY, "train.max_steps=3",
                             "distributed=deepspeed", f"run_dir={tmp_path}/run"], env={**env, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["world_size"] == 1 and summary["steps"] == 3



@pytest.mark.trains
def test_train_composes_its_config_once(tmp_path, monkeypatch):
    """One path from the command line to the run: Hydra's compose runs once, and no Hydra app composes again."""
    import hydra

    from conftest import TINY
    from llmstable.cli import main

    calls = []
    real = hydra.compose
    monkeypatch.setattr(hydra, "compose", lambda *a, **k: calls.append(k.get("overrides")) or real(*a, **k))
    monkeypatch.setattr(hydra, "main", lambda *a, **k: pytest.fail("a single run needs no Hydra app"))
    assert main(["train", *TINY, "train.max_steps=2", f"run_dir={tmp_path}/run"]) == 0
    assert len(calls) == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    assert (tmp_path / "run" / "train.log").is_file()
