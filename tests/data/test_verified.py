"""Starting on a prepared corpus in O(1) of its size (llmstable.data.shards.verify_shards): a start hashes only the
shards that are new or changed since they were verified; `llmstable verify` hashes all of them and finds what a
start cannot (a flipped byte that changed no size or modification time)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmstable.data import DataError
from llmstable.data import shards as shard_module
from llmstable.data.prepare import prepare
from llmstable.data.shards import VERIFIED, PreparedCorpus
from tests.data.corpora import hf_files_cfg


@pytest.fixture
def prepared(tmp_path, tokenizer_dir, jsonl_dir):
    return prepare(hf_files_cfg(jsonl_dir / "*.json.gz", tokenizer_dir, shard_tokens=20000), tmp_path / "p",
                   progress=False)


def counting_hashes(monkeypatch) -> list:
    hashed = []
    original = shard_module.sha256_file
    monkeypatch.setattr(shard_module, "sha256_file", lambda path, *a: hashed.append(path.name) or original(path, *a))
    return hashed


@pytest.mark.subprocess
def test_a_start_hashes_no_shard_that_prepare_or_an_earlier_start_verified(prepared, monkeypatch):
    assert (prepared / VERIFIED).is_file()  # prepare hashed the shards as it wrote them
    hashed = counting_hashes(monkeypatch)
    PreparedCorpus(prepared)
    assert hashed == []
    victim = prepared / "train-00001.bin"
    os.utime(victim)  # touched: no longer vouched for
    PreparedCorpus(prepared)
    assert hashed == ["train-00001.bin"]
    PreparedCorpus(prepared)  # verified again, and recorded
    assert hashed == ["train-00001.bin"]


@pytest.mark.subprocess
def test_a_flipped_byte_that_keeps_size_and_time_is_found_by_verify(prepared, monkeypatch):
    victim = prepared / "train-00000.bin"
    stat = victim.stat()
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # what a bit flip on disk looks like from outside
    PreparedCorpus(prepared)  # a start checks sizes and trusts the record (documented)
    result = subprocess.run([sys.executable, "-m", "llmstable.cli", "verify", str(prepared)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "train-00000.bin has SHA-256" in result.stderr and "Traceback" not in result.stderr
    os.utime(victim)  # once its time changes, a start hashes it and refuses it, naming the file
    with pytest.raises(DataError, match=r"train-00000.bin has SHA-256"):
        PreparedCorpus(prepared)


@pytest.mark.trains
@pytest.mark.subprocess
def test_verify_passes_an_intact_corpus_and_a_run_and_names_what_it_is_not(prepared, tmp_path, tiny_config):
    from llmstable.trainer import train

    ok = subprocess.run([sys.executable, "-m", "llmstable.cli", "verify", str(prepared)], capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0 and "ok: prepared corpus" in ok.stdout
    train(tiny_config(run_dir=tmp_path / "run"))
    run = subprocess.run([sys.executable, "-m", "llmstable.cli", "verify", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "2 checkpoint(s)" in run.stdout
    (tmp_path / "run" / "checkpoints" / "step_00000006" / "rng.pt").write_bytes(b"x")
    bad = subprocess.run([sys.executable, "-m", "llmstable.cli", "verify", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "step_00000006" in bad.stderr and "rng.pt" in bad.stderr
    none = subprocess.run([sys.executable, "-m", "llmstable.cli", "verify", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert none.returncode == 2 and "is not a prepared corpus" in none.stderr
