"""From documents to training batches: tokenize, pack, order, and remember the position.

Packing: each document's tokens are followed by EOS, everything is joined into one stream, and the stream is cut
into non-overlapping blocks of seq_len + 1 tokens (inputs are block[:-1], targets block[1:]).

The blocks are read from memory-mapped token shards (shards.py), which `llmstable prepare` writes, or which the
first run on a corpus prepares into the cache (prepare.py).

Order: the loader hands out samples by *ordinal*, the sample's position in the run's stream (0, 1, 2, ... across
epochs). Ordinal o is block perm_e[o mod n] of epoch e = o // n, where perm_e is a permutation drawn from
(seed, e) (order.py; past 4M blocks a constant-memory one). An ordinal is the absolute sample id: it does not
depend on step numbers, batch sizes or world size, and the loader's whole position is one integer, so saving and
restoring it resumes exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from llmstable.config import DataConfig
from llmstable.data.order import EpochOrder, epoch_permutation  # noqa: F401  (epoch_permutation: public name)
from llmstable.data.packing import (  # noqa: F401  (re-exported: the loader's public names)
    DataBundle, SkipList, encode_stream, next_ordinals, pack_blocks, pack_stream,
)
from llmstable.data.shards import MANIFEST, PreparedCorpus, ShardBlocks


class SampleLoader:
    """Serves batches of packed blocks in a seeded order; its position is one ordinal (see module doc).
    `blocks` is an (n, seq_len + 1) array or anything indexable like one, such as memory-mapped ShardBlocks."""

    def __init__(self, blocks, seed: int):
        self.blocks = blocks
        self.seed = seed
        self.ordinal = 0
        self.skip = SkipList()  # owned by the trainer, which keeps it across rollbacks
        self._order = EpochOrder(len(blocks), seed)

    def __len__(self) -> int:
        return len(self.blocks)

    def block_index(self, ordinal: int) -> int:
        return self._order(ordinal)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[int]]:
        """The next batch_size samples (skipping the skip list) as a (B, seq_len + 1) int64 tensor, and their
        ordinals."""
        return self.next_share(batch_size, 0, batch_size)

    def next_share(self, count: int, start: int, stop: int) -> tuple[torch.Tensor, list[int]]:
        """Advance past the next `count` samples (one global batch) and return samples [start, stop) of them: a
        rank's disjoint share. Every rank advances alike, so the position stays global."""
        ordinals, self.ordinal = next_ordinals(self.ordinal, count, self.skip)
        mine = ordinals[start:stop]
        rows = np.stack([self.blocks[self.block_index(o)] for o in mine]).astype(np.int64)
        return torch.from_numpy(rows), mine

    def state_dict(self) -> dict:
        return {"ordinal": self.ordinal}

    def load_state_dict(self, state: dict) -> None:
        self.ordinal = int(state["ordinal"])


def build_data(cfg: DataConfig, seed: int, min_train_blocks: int) -> DataBundle:
    """Corpus -> tokenizer -> packed train loader and validation blocks, with clear errors for corpora that
    are too small. A non-streaming corpus is read from token shards: data.path itself for data.source=prepared,
    otherwise the cache, where it is prepared (in parallel) on first use."""
    from llmstable.data.corpus import DataError

    if cfg.streaming:
        from llmstable.data.stream import build_stream_data

        return build_stream_data(cfg, seed, min_train_blocks)
    corpus = open_prepared(cfg)
    origin = {"sotu": "the sotu corpus", "prepared": f"the prepared directory {cfg.path}"}.get(
        cfg.source, f"data.path={cfg.path!r}")
    blocks = ShardBlocks(corpus.train, cfg.seq_len)
    if len(blocks) < min_train_blocks:
        raise DataError(
            f"{origin} is too small for one batch: its training split has {len(corpus.train)} tokens, "
            f"{len(blocks)} blocks of data.seq_len + 1 = {cfg.seq_len + 1}, and one global batch needs "
            f"{min_train_blocks}. Add text, lower data.seq_len, or lower train.global_batch_size."
        )
    val_tokens = corpus.val.slice(0, cfg.val_max_blocks * (cfg.seq_len + 1))
    val_blocks = torch.from_numpy(pack_blocks(val_tokens, cfg.seq_len))
    if len(val_blocks) == 0:
        raise DataError(
            f"the validation documents of {origin} hold fewer than data.seq_len + 1 = {cfg.seq_len + 1} tokens: "
            "raise data.val_fraction or lower data.seq_len"
        )
    return DataBundle(corpus.tokenizer, SampleLoader(blocks, seed), val_blocks, len(corpus.tokenizer),
                      len(corpus.train))


def open_prepared(cfg: DataConfig) -> PreparedCorpus:
    """The verified token shards of the config's corpus; sources other than `prepared` are prepared into the
    cache first (once: later runs find the manifest), and a damaged cache entry is repaired."""
    from llmstable.data.corpus import DataError
    from llmstable.data.prepare import prepare, prepared_cache_dir

    if cfg.source == "prepared":
        return PreparedCorpus(Path(os.path.expanduser(cfg.path)), cfg.tokenizer.name_or_path)
    root = prepared_cache_dir(cfg)
    if not (root / MANIFEST).exists():
        prepare(cfg, root)  # (progress: a bar on a terminal, a plain line every 20 s in a log)
    try:
        return PreparedCorpus(root)
    except DataError:
        prepare(cfg, root)  # rewrites what fails its checks
        return PreparedCorpus(root)
