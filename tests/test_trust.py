"""No load path unpickles code from a checkpoint it cannot vouch for: planted pickle payloads in DCP and DeepSpeed
checkpoints (with a recomputed manifest) are refused by export, generate and resume, and no payload ever runs."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TINY
from llmstable import checkpoint as ckpt
from llmstable import trust
from llmstable.export import export_hf, load_trained
from llmstable.trainer import train


class Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from llmstable.compose import compose_config

    run = tmp_path_factory.mktemp("trust") / "run"
    train(compose_config([*TINY, "train.max_steps=3"], run_dir=run))
    return run


def rewrite_manifest(checkpoint, signature=None):
    """What an attacker can do: recompute every checksum (but not sign with the victim's key)."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name not in ckpt.UNLISTED):
        name = str(path.relative_to(checkpoint))
        files[name] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest = {"step": ckpt.read_state(checkpoint)["step"], "files": files}
    if signature is not None:
        manifest["signature"] = signature
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


def plant(trained_run, tmp_path, fmt):
    """A copy of the run whose newest checkpoint claims format `fmt` and carries a payload where that format's
    reader unpickles."""
    run = tmp_path / f"crafted_{fmt}"
    shutil.copytree(trained_run, run)
    checkpoint = ckpt.latest_valid(run / "checkpoints")
    marker = tmp_path / f"marker_{fmt}"
    state = ckpt.read_state(checkpoint)
    state["engine"] = {"name": "fsdp2" if fmt == "dcp" else "deepspeed", "format": fmt, "world_size": 1,
                       "zero_stage": 0}
    (checkpoint / "state.json").write_text(json.dumps(state))
    if fmt == "dcp":
        (checkpoint / "dcp").mkdir()
        (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    else:
        (checkpoint / "deepspeed" / "state").mkdir(parents=True)
        torch.save({"module": {}, "hook": Payload(marker)}, checkpoint / "deepspeed" / "state" /
                   "mp_rank_00_model_states.pt")
    rewrite_manifest(checkpoint)
    assert ckpt.verify(checkpoint) is None  # integrity holds: only authenticity can stop it
    return run, marker


def cli(*args):
    return subprocess.run([sys.executable, "-m", "llmstable.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("fmt", ["dcp", "deepspeed"])
@pytest.mark.trains
@pytest.mark.subprocess
def test_a_planted_payload_is_refused_by_export_generate_and_resume(trained_run, tmp_path, fmt, tiny_config):
    run, marker = plant(trained_run, tmp_path, fmt)
    with pytest.raises(ckpt.CheckpointError, match=r"not written by llmstable under this account.*--trust-checkpoint"):
        export_hf(run, tmp_path / "hf")
    with pytest.raises(ckpt.CheckpointError, match="--trust-checkpoint"):
        load_trained(run)
    with pytest.raises(ckpt.CheckpointError, match="resume_trust=true"):
        train(tiny_config("train.max_steps=5", run_dir=run))
    done = cli("generate", str(run), "--max-new-tokens", "3")
    assert done.returncode == 2 and "--trust-checkpoint" in done.stderr and "Traceback" not in done.stderr
    done = cli("train", *TINY, "train.max_steps=5", f"run_dir={run}")
    assert done.returncode == 2 and "resume_trust=true" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


@pytest.mark.trains
@pytest.mark.subprocess
def test_deepspeed_files_are_read_weights_only_even_when_trusted(trained_run, tmp_path):
    run, marker = plant(trained_run, tmp_path, "deepspeed")
    with pytest.raises(ckpt.CheckpointError, match="weights-only loader refuses"):
        export_hf(run, tmp_path / "hf", trusted=True)
    done = cli("export", str(run), str(tmp_path / "hf2"), "--trust-checkpoint")
    assert done.returncode == 2 and "weights-only loader refuses" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


@pytest.mark.trains
def test_a_forged_signature_does_not_pass(trained_run, tmp_path):
    run, marker = plant(trained_run, tmp_path, "dcp")
    checkpoint = ckpt.latest_valid(run / "checkpoints")
    rewrite_manifest(checkpoint, signature="0" * 64)
    with pytest.raises(ckpt.CheckpointError, match="--trust-checkpoint"):
        export_hf(run, tmp_path / "hf")
    assert not marker.exists()


@pytest.mark.trains
def test_manifests_are_signed_with_the_writers_key_and_only_that_key(trained_run, tmp_path, monkeypatch):
    checkpoint = ckpt.latest_valid(trained_run / "checkpoints")
    manifest = ckpt.read_manifest(checkpoint)
    assert trust.signed_here(manifest)
    assert oct(os.stat(trust.writer_key_file()).st_mode & 0o777) == "0o600"
    assert not trust.signed_here({**manifest, "step": manifest["step"] + 1})  # the signature covers the contents
    monkeypatch.setenv("LLMSTABLE_KEY_FILE", str(tmp_path / "someone-else.key"))
    (tmp_path / "someone-else.key").write_text("another secret")
    assert not trust.signed_here(manifest)


@pytest.mark.trains
def test_an_own_fsdp2_checkpoint_loads_and_a_foreign_one_needs_trust(tmp_path, tiny_config, monkeypatch):
    run = tmp_path / "fsdp2"
    train(tiny_config("train.max_steps=2", "distributed=fsdp2", run_dir=run))
    checkpoint = ckpt.latest_valid(run / "checkpoints")
    assert ckpt.state_format(ckpt.read_state(checkpoint)) == "dcp"
    export_hf(run, tmp_path / "hf")  # written here: signed, so it loads
    monkeypatch.setenv("LLMSTABLE_KEY_FILE", str(tmp_path / "other-account.key"))  # as another user would see it
    with pytest.raises(ckpt.CheckpointError, match="--trust-checkpoint"):
        export_hf(run, tmp_path / "hf2")
    out = export_hf(run, tmp_path / "hf3", trusted=True)
    assert (out / "model.safetensors").is_file()


def test_the_planted_payload_is_live(tmp_path):
    """The tests above would catch a loader that unpickles: this payload really runs when unpickled."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "pwned"
