"""Data configs for the small corpora of conftest.py."""

from __future__ import annotations

from llmstable.config import DataConfig, TokenizerConfig


def hf_files_cfg(path, tokenizer_dir, **kw) -> DataConfig:
    kw.setdefault("format", "jsonl")
    kw.setdefault("seq_len", 32)
    return DataConfig(source="files", path=str(path),
                      tokenizer=TokenizerConfig(kind="hf", name_or_path=str(tokenizer_dir)), **kw)
