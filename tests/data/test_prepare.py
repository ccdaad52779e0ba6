"""`llmstable prepare`: token shards equal to the in-memory packing, resumable after a kill, and named errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmstable.config import DataConfig, TokenizerConfig
from llmstable.data import DataError, build_data, load_corpus
from llmstable.data.loader import SampleLoader, encode_stream, pack_blocks
from llmstable.data.prepare import prepare
from llmstable.data.shards import PreparedCorpus, PrepareDiskFull, ShardWriter
from tests.data.corpora import hf_files_cfg

REPO = Path(__file__).resolve().parents[2]


def checksums(root: Path) -> list[tuple[str, int, str]]:
    manifest = json.loads((root / "manifest.json").read_text())
    return [(e["file"], e["tokens"], e["sha256"]) for e in manifest["train"] + manifest["val"]]


@pytest.mark.subprocess
def test_shards_hold_the_in_memory_token_stream_and_serve_the_same_blocks_in_the_same_order(tmp_path, tokenizer_dir,
                                                                                           jsonl_dir):
    cfg = hf_files_cfg(jsonl_dir / "*.json.gz", tokenizer_dir, shard_tokens=5000, workers=2)
    root = prepare(cfg, tmp_path / "out", progress=False)
    prepared = PreparedCorpus(root)
    assert len(prepared.manifest["train"]) > 3  # the stream really is cut into several shards
    # The reference: the path every run took before shards existed (documents in memory, encoded, concatenated).
    corpus = load_corpus(cfg)
    tok = prepared.tokenizer
    want = np.concatenate(list(encode_stream(tok, corpus.train["text"])))
    assert np.array_equal(prepared.train.slice(0, len(prepared.train)), want)
    want_val = np.concatenate(list(encode_stream(tok, corpus.val["text"])))
    assert np.array_equal(prepared.val.slice(0, len(prepared.val)), want_val)
    data = build_data(DataConfig(source="prepared", path=str(root), seq_len=32), seed=3, min_train_blocks=8)
    reference = SampleLoader(pack_blocks(want, 32), seed=3)
    for _ in range(5):
        assert torch.equal(data.train.next_batch(16)[0], reference.next_batch(16)[0])


# sha256 of the first 10 batches of 8 (and of the validation blocks) that the in-memory loader served on the test
# config (sotu, BPE 512, seq_len 32, seed 0) before token shards existed: the default corpus' data is unchanged.
GOLDEN_ROWS = "b6c75e9cc3f639ce71c6556e09448a28bc75f19e93c0b5cba96f22d9ba2fbda9"
GOLDEN_VAL = "d061f4d4dededf5dd259c308de435983b2161b2840f73ae67f7bab0799ca3b54"


@pytest.mark.subprocess
def test_the_default_corpus_serves_the_blocks_of_the_loader_before_shards(tiny_config):
    import hashlib

    data = build_data(tiny_config().data, seed=0, min_train_blocks=8)
    rows = torch.cat([data.train.next_batch(8)[0] for _ in range(10)]).numpy()
    assert hashlib.sha256(rows.tobytes()).hexdigest() == GOLDEN_ROWS
    assert hashlib.sha256(data.val_blocks.numpy().tobytes()).hexdigest() == GOLDEN_VAL


@pytest.mark.slow
@pytest.mark.trains
def test_prepare_then_train_equals_training_without_prepare(tiny_config, tmp_path):
    from llmstable.cli import main
    from llmstable.trainer import train

    def losses(run_dir):
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]

    direct = tiny_config("train.max_steps=4", "train.checkpoint_interval=100", run_dir=tmp_path / "direct")
    train(direct)
    assert main(["prepare", "data.seq_len=32", "data.tokenizer.vocab_size=512", f"out={tmp_path / 'prepared'}"]) == 0
    from_shards = tiny_config("train.max_steps=4", "train.checkpoint_interval=100", "data=prepared",
                              f"data.path={tmp_path / 'prepared'}", "data.seq_len=32", run_dir=tmp_path / "shards")
    train(from_shards)
    assert losses(tmp_path / "shards") == losses(tmp_path / "direct") and len(losses(tmp_path / "direct")) == 4


@pytest.mark.subprocess
def test_kill_9_during_prepare_then_rerun_gives_the_same_shards_without_redoing_finished_ones(tmp_path, tokenizer_dir,
                                                                                              jsonl_dir):
    cfg = hf_files_cfg(jsonl_dir / "*.json.gz", tokenizer_dir, shard_tokens=4000, workers=1)
    whole = prepare(cfg, tmp_path / "whole", progress=False)
    out = tmp_path / "killed"
    # The child slows down after each shard (0.3 s) so that the kill lands while shards remain to be written.
    script = ("import sys, time; from llmstable.data import prepare as p; from tests.data.corpora import hf_files_cfg\n"
              "close = p._ShardRun.close\n"
              "p._ShardRun.close = lambda self: (close(self), time.sleep(0.3))\n"
              f"p.prepare(hf_files_cfg({str(jsonl_dir / '*.json.gz')!r}, {str(tokenizer_dir)!r}, shard_tokens=4000, "
              "workers=1), sys.argv[1], progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        progress = out / "progress.json"
        if progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "prepare finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = json.loads((out / "progress.json").read_text())["shards"]
    first = out / done[0]["train"]["file"]
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    prepare(cfg, out, progress=False)
    assert checksums(out) == checksums(whole)
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp  # finished shards are not rewritten
    assert not list(out.glob(".*.tmp*"))


@pytest.mark.subprocess
def test_ctrl_c_during_prepare_stops_at_once_with_one_line(tmp_path, tokenizer_dir, jsonl_dir):
    # Ctrl-C reaches the whole process group. The pool used to wait for every chunk already handed to the workers
    # (here each takes 30 s: it hung for minutes on big chunks under load); the workers printed their own tracebacks.
    out = tmp_path / "out"
    script = ("import sys, time; from llmstable.data import prepare as p; from llmstable.cli import main\n"
              "chunk = p.tokenize_chunk\n"
              "def slow(*args):\n    time.sleep(30)\n    return chunk(*args)\n"
              "p.tokenize_chunk = slow\n"
              f"sys.exit(main(['prepare', 'data=local_files', 'data.path={jsonl_dir}/*.json.gz', 'data.format=jsonl', "
              f"'data.tokenizer.kind=hf', 'data.tokenizer.name_or_path={tokenizer_dir}', 'data.workers=2', "
              f"'data.shard_tokens=4000', 'out={out}']))")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "tokenizer").exists():  # (then the pool is at work)
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    began = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - began < 10, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C)" and "Traceback" not in err
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp*"))


@pytest.mark.subprocess
def test_a_full_disk_is_a_named_error_leaves_no_half_shard_and_a_rerun_completes(tmp_path, tokenizer_dir, jsonl_dir,
                                                                                 monkeypatch):
    cfg = hf_files_cfg(jsonl_dir / "*.json.gz", tokenizer_dir, shard_tokens=5000, workers=1)
    whole = prepare(cfg, tmp_path / "whole", progress=False)
    real_append, calls = ShardWriter.append, []

    class FullDisk:  # the shard file as the OS behaves once the disk is full
        def __init__(self, f):
            self.f, self.closed = f, False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()
            self.closed = True

    def append_until_full(self, tokens):
        calls.append(1)
        if len(calls) == 7:  # the train file of the fourth shard
            self._file = FullDisk(self._file)
        real_append(self, tokens)

    monkeypatch.setattr(ShardWriter, "append", append_until_full)
    out = tmp_path / "full"
    pattern = r"disk is full: writing .*/train-\d{5}\.bin needed about .* MB more and .* MB are free"
    with pytest.raises(PrepareDiskFull, match=pattern):
        prepare(cfg, out, progress=False)
    finished = {e["train"]["file"] for e in json.loads((out / "progress.json").read_text())["shards"]}
    visible = {p.name for p in out.glob("train-*.bin")}
    assert visible == finished and not list(out.glob(".*.tmp*"))  # nothing half-written is visible
    monkeypatch.setattr(ShardWriter, "append", real_append)
    prepare(cfg, out, progress=False)
    assert checksums(out) == checksums(whole)


@pytest.fixture
def prepared_dir(tmp_path, tokenizer_dir, jsonl_dir):
    return prepare(hf_files_cfg(jsonl_dir / "*.json.gz", tokenizer_dir, shard_tokens=20000), tmp_path / "p",
                   progress=False)


@pytest.mark.subprocess
def test_a_changed_tokenizer_names_the_folder_and_the_fix(prepared_dir):
    tokenizer_json = prepared_dir / "tokenizer" / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text())
    spec["model"]["vocab"]["zzzz"] = len(spec["model"]["vocab"]) + 50
    tokenizer_json.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"tokenizer has changed since the shards were made.*prepare"):
        PreparedCorpus(prepared_dir)


@pytest.mark.subprocess
def test_a_config_tokenizer_other_than_the_prepared_one_is_refused(prepared_dir, tmp_path):
    from llmstable.data.tokenizer import build_tokenizer

    build_tokenizer(TokenizerConfig(vocab_size=280), iter(["other text " * 50]), "o", tmp_path).save_pretrained(
        str(tmp_path / "other"))
    cfg = DataConfig(source="prepared", path=str(prepared_dir), seq_len=32,
                     tokenizer=TokenizerConfig(kind="hf", name_or_path=str(tmp_path / "other")))
    with pytest.raises(DataError, match=r"data.tokenizer.name_or_path=.*other.*is not the tokenizer"):
        build_data(cfg, seed=0, min_train_blocks=1)


@pytest.mark.subprocess
def test_a_missing_shard_names_the_file_and_a_rerun_of_prepare_repairs_it(prepared_dir, tokenizer_dir, jsonl_dir):
    before = checksums(prepared_dir)
    (prepared_dir / "train-00001.bin").unlink()
    with pytest.raises(DataError, match=r"train-00001.bin is missing.*Rerun the `llmstable prepare`"):
        PreparedCorpus(prepared_dir)
    prepare(hf_files_cfg(jsonl_dir / "*.json.gz", tokenizer_dir, shard_tokens=20000), prepared_dir, progress=False)
    assert checksums(prepared_dir) == before


@pytest.mark.subprocess
def test_a_corrupted_shard_is_a_checksum_mismatch_naming_the_file(prepared_dir):
    victim = prepared_dir / "train-00000.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00000.bin has SHA-256 .* the manifest says"):
        PreparedCorpus(prepared_dir)


def test_a_directory_without_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(DataError, match=r"data.path=.*nothing.*is not a prepared token directory.*llmstable prepare"):
        build_data(DataConfig(source="prepared", path=str(tmp_path / "nothing"), seq_len=32), 0, 1)


@pytest.mark.subprocess
def test_preparing_another_corpus_into_the_same_directory_is_refused(prepared_dir, tokenizer_dir, text_corpus):
    with pytest.raises(DataError, match=r"was prepared from another corpus.*differs in: .*files"):
        prepare(hf_files_cfg(text_corpus / "*.txt", tokenizer_dir, format="text"), prepared_dir, progress=False)


@pytest.mark.subprocess
def test_an_undecodable_file_among_good_ones_is_named(tmp_path, tokenizer_dir):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("A perfectly good document. " * 40)
    (tmp_path / "c.txt").write_bytes(bytes(range(128, 256)) * 8)
    cfg = hf_files_cfg(tmp_path / "*.txt", tokenizer_dir, format="text")
    with pytest.raises(DataError, match=r"could not read .*c\.txt .*data.format=text: byte 0 \(line 1\) is not valid "
                                        r"UTF-8 \(0x80\)\. Fix: convert the file to UTF-8"):
        prepare(cfg, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=r"could not read .*c\.txt .*data.format=text"):
        load_corpus(cfg)  # the in-memory reader names the same file


def _killed(*args):  # (module level: the pool sends it to the worker by name)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.subprocess
def test_a_killed_worker_is_a_named_error_and_a_rerun_completes(tmp_path, tokenizer_dir, jsonl_dir, monkeypatch):
    import llmstable.data.prepare as prepare_module
    from llmstable.data.prepare import PrepareWorkerDied

    cfg = hf_files_cfg(jsonl_dir / "*.json.gz", tokenizer_dir, workers=1)
    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "tokenize_chunk", _killed)
        with pytest.raises(PrepareWorkerDied, match=r"a tokenizer worker of `prepare` into .* died .*rerun the same "
                                                    r"command to continue.*lower data.workers \(now 1\)"):
            prepare(cfg, tmp_path / "out", progress=False)
    prepare(cfg, tmp_path / "out", progress=False)
    assert checksums(tmp_path / "out") == checksums(prepare(cfg, tmp_path / "whole", progress=False))


@pytest.mark.subprocess
def test_an_empty_file_among_good_ones_holds_no_documents(tmp_path, tokenizer_dir, jsonl_dir):
    import shutil

    for f in sorted(jsonl_dir.iterdir()):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "c4-train.00003-of-00008.json.gz").write_bytes(b"")  # (it used to stop prepare: StopIteration)
    (tmp_path / "empty.json.gz").write_bytes(__import__("gzip").compress(b""))
    with_empty = prepare(hf_files_cfg(tmp_path / "*.json.gz", tokenizer_dir), tmp_path / "a", progress=False)
    for name in ("c4-train.00003-of-00008.json.gz", "empty.json.gz"):
        (tmp_path / name).unlink()
    without = prepare(hf_files_cfg(tmp_path / "*.json.gz", tokenizer_dir), tmp_path / "b", progress=False)
    assert checksums(with_empty) == checksums(without)


@pytest.mark.subprocess
def test_a_prepared_tokenizer_that_asks_for_code_is_refused_before_any_load(prepared_dir, tmp_path):
    config = json.loads((prepared_dir / "tokenizer" / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (prepared_dir / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"tokenizer has changed since the shards were made"):  # its files' hash
        PreparedCorpus(prepared_dir)
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    del manifest["tokenizer"]["files_sha256"]  # (a directory prepared before the hash was recorded)
    (prepared_dir / "manifest.json").write_text(json.dumps(manifest))
    (prepared_dir / "tokenizer" / "evil.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w').close()\n")
    with pytest.raises(DataError, match=r"tokenizer is not a tokenizer llmstable wrote: it holds Python code: evil.py"):
        PreparedCorpus(prepared_dir)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.subprocess
def test_prepare_writes_a_plain_progress_line_to_a_log(tmp_path, tokenizer_dir, jsonl_dir, capfd, monkeypatch):
    monkeypatch.setenv("LLMSTABLE_PROGRESS_S", "0.001")
    prepare(hf_files_cfg(jsonl_dir / "*.json.gz", tokenizer_dir), tmp_path / "out")
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("prepare: tokenizing: ")]
    assert lines and "\r" not in "".join(lines)
    assert "docs" in lines[-1] and "docs/s" in lines[-1] and "file=8/8" in lines[-1]


@pytest.mark.subprocess
def test_an_empty_corpus_is_refused_before_anything_is_written(tmp_path, tokenizer_dir):
    for i in range(3):
        (tmp_path / f"e{i}.txt").write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        prepare(hf_files_cfg(tmp_path / "*.txt", tokenizer_dir, format="text"), tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.bin"))


@pytest.mark.subprocess
def test_the_cli_needs_out_and_prints_how_to_train(tmp_path, tokenizer_dir, jsonl_dir, capsys):
    from llmstable.cli import main

    assert main(["prepare", "data=local_files"]) == 2
    assert "needs out=DIR" in capsys.readouterr().err
    args = ["prepare", "data=local_files", f"data.path={jsonl_dir}/*.json.gz", "data.format=jsonl",
            "data.tokenizer.kind=hf", f"data.tokenizer.name_or_path={tokenizer_dir}", f"out={tmp_path / 'cli'}"]
    assert main(args) == 0
    assert f"data=prepared data.path={tmp_path / 'cli'}" in capsys.readouterr().out


@pytest.mark.subprocess
def test_zst_jsonl_and_parquet_prepare_to_the_same_shards_as_gzip(tmp_path, tokenizer_dir, jsonl_dir):
    import gzip

    import pandas as pd
    import zstandard

    rows = [json.loads(line) for f in sorted(jsonl_dir.glob("*.json.gz")) for line in gzip.open(f, "rt")][:60]
    (tmp_path / "zst").mkdir()
    (tmp_path / "pq").mkdir()
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "zst" / "all.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    pd.DataFrame(rows).to_parquet(tmp_path / "pq" / "all.parquet")
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "all.jsonl.gz", "wt") as f:
        f.write(text.decode())
    inputs = (("gz", "*.gz", "jsonl"), ("zst", "*.zst", "jsonl"), ("pq", "*.parquet", "parquet"))
    sums = [checksums(prepare(hf_files_cfg(tmp_path / sub / pattern, tokenizer_dir, format=fmt), tmp_path / f"o{sub}",
                              progress=False)) for sub, pattern, fmt in inputs]
    assert sums[0] == sums[1] == sums[2] and sums[0]


@pytest.mark.subprocess
def test_a_corpus_with_no_document_in_validation_holds_out_the_smallest_hash_as_before(tmp_path, tokenizer_dir):
    for i in range(4):
        (tmp_path / f"d{i}.txt").write_text(f"Document number {i} of four. " * 30)
    cfg = hf_files_cfg(tmp_path / "*.txt", tokenizer_dir, format="text")
    reference = load_corpus(cfg)  # the in-memory split, which holds out the document with the smallest hash
    assert len(reference.val) == 1
    prepared = PreparedCorpus(prepare(cfg, tmp_path / "out", progress=False))
    tok = prepared.tokenizer
    assert np.array_equal(prepared.val.slice(0, len(prepared.val)),
                          np.concatenate(list(encode_stream(tok, reference.val["text"]))))
    assert np.array_equal(prepared.train.slice(0, len(prepared.train)),
                          np.concatenate(list(encode_stream(tok, reference.train["text"]))))


def test_bad_data_settings_name_the_key_the_value_and_the_fix(tmp_path):
    from llmstable.compose import compose_config
    from llmstable.config import ConfigError

    with pytest.raises(ConfigError) as err:
        compose_config(["data.workers=0", "data.shard_tokens=10", "data.stream_lanes=0", "data=prepared",
                        "data.path=", "data.streaming=true"], run_dir=tmp_path)
    for expected in ("data.workers=0 must be >= 1", "data.shard_tokens=10 must be >= 1024",
                     "data.stream_lanes=0 must be >= 1", "data.path is required when data.source=prepared",
                     "data.streaming=true needs data.source=files or hub; data.source=prepared"):
        assert expected in str(err.value)
