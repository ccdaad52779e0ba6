"""From documents to samples, the parts every loader shares: token ids per document (each followed by EOS),
packing into blocks of seq_len + 1, the skip list of sample ordinals never to serve, and the bundle the trainer
gets. The in-memory loader (llmstable.data.loader) and the streaming one (llmstable.data.stream) both build on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from llmstable.ranges import add_range


def encode_stream(tok, texts: Iterable[str], batch_size: int = 64) -> Iterator[np.ndarray]:
    """Token ids of each document followed by EOS, one array per document."""
    eos = tok.eos_token_id
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield from _encode_batch(tok, batch, eos)
            batch = []
    if batch:
        yield from _encode_batch(tok, batch, eos)


def _encode_batch(tok, texts: list[str], eos: int) -> Iterator[np.ndarray]:
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        yield np.asarray(ids + [eos], dtype=np.int64)


def pack_blocks(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut the token stream into (n, seq_len + 1) blocks; the tail shorter than a block is dropped."""
    n = len(tokens) // (seq_len + 1)
    return np.asarray(tokens[: n * (seq_len + 1)]).reshape(n, seq_len + 1)


def pack_stream(docs_ids: Iterable[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
    """The streaming form of pack_blocks: yields (seq_len + 1,) blocks as documents' tokens arrive."""
    buffer = np.zeros(0, dtype=np.int64)
    for ids in docs_ids:
        buffer = np.concatenate([buffer, ids])
        while len(buffer) >= seq_len + 1:
            yield buffer[: seq_len + 1]
            buffer = buffer[seq_len + 1:]


class SkipList:
    """Half-open ranges [start, end) of sample ordinals that the loader must never serve (data around a spike).
    Keyed by ordinal, not step, so it means the same samples after any restart, batch size or world size."""

    def __init__(self, ranges: list | None = None):
        self.ranges: list[list[int]] = sorted([int(a), int(b)] for a, b in (ranges or []))

    def add(self, start: int, end: int) -> None:
        self.ranges = add_range(self.ranges, start, end)

    def __contains__(self, ordinal: int) -> bool:
        return any(a <= ordinal < b for a, b in self.ranges)

    def __len__(self) -> int:
        return sum(b - a for a, b in self.ranges)


def next_ordinals(start: int, count: int, skip: SkipList) -> tuple[list[int], int]:
    """The next `count` ordinals from `start` that are not skipped, and the position after them."""
    ordinals, o = [], start
    while len(ordinals) < count:
        if o not in skip:
            ordinals.append(o)
        o += 1
    return ordinals, o


@dataclass
class DataBundle:
    tokenizer: object
    train: object  # a SampleLoader (loader.py) or a StreamingSampleLoader (stream.py): the same interface
    val_blocks: torch.Tensor  # (n_val, seq_len + 1), fixed and in order
    vocab_size: int
    train_tokens: int | None  # None when streaming (unknown without a full pass)
