"""Streaming: train on a `datasets.IterableDataset` (the Hub, or local files) that is never tokenized ahead.

Lanes. The training documents are dealt into `data.stream_lanes` = S lanes by file shard
(`datasets.distributed.split_dataset_by_node(stream, rank=lane, world_size=S)`), each lane packs its own
documents into blocks, and sample ordinal o is block o // S of lane o % S. The samples are therefore the same at
any world size; rank r of W reads, tokenizes and serves only lanes [r S/W, (r+1) S/W), that is only its own files.
Skip-list ranges are applied in whole rounds of S ordinals, so every global batch (a multiple of S samples) holds
the same number of blocks from every lane and each rank's share is exactly its lanes' blocks.

Order. A lane is read in windows of `data.shuffle_buffer` documents; each window is permuted by a generator
seeded with (seed, epoch, lane, window). (A classic shuffle buffer cannot be resumed exactly without saving its
contents; a window can.)

Resume in O(1). A lane's cursor at a block boundary is the `datasets` `state_dict()` at the start of the
current window, the document within the window, and the token offset within that document (the packing buffer is
empty at a block boundary). Restoring re-reads one window from that state: the cost depends on the window and the
file, not on how far the run has gone. Where a stream cannot be split by file (fewer or indivisible file shards)
the loader refuses with a named error instead of reading everyone's documents.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from llmstable.config import DataConfig
from llmstable.data.corpus import DataError
from llmstable.data.packing import SkipList

ENCODE_BATCH = 64  # documents per tokenizer call


class StreamError(DataError):
    """A stream that cannot be read by lanes with an exact, O(1) resume; the message says what to do instead."""


class LaneStream:
    """One lane: its documents, window-shuffled per epoch, tokenized and packed; `cursor` resumes it exactly."""

    def __init__(self, open_docs, tok, seq_len: int, seed: int, lane: int, window: int, cursor: dict | None = None,
                 read_error=None):
        self.open_docs, self.tok, self.width = open_docs, tok, seq_len + 1
        self.seed, self.lane, self.window = seed, lane, window
        self.read_error = read_error or (lambda err: err)  # an exception while reading -> the error to raise
        self.cursor = cursor or {"epoch": 0, "state": None, "window": 0, "doc": 0, "token": 0}
        self._blocks = self._generate()

    def __next__(self) -> np.ndarray:
        return next(self._blocks)

    def _encode(self, texts: list[str]):
        backend = self.tok.backend_tokenizer
        return getattr(backend, "encode_batch_fast", backend.encode_batch)(texts, add_special_tokens=False)

    def _generate(self) -> Iterator[np.ndarray]:
        c, buffer, filled = dict(self.cursor), [], 0
        while True:  # epochs
            ds = self.open_docs()  # a fresh stream each epoch, so no earlier state carries over
            if c["state"] is not None:
                ds.load_state_dict(c["state"])
            rows, state, read, fresh = iter(ds), c["state"], 0, c["state"] is None
            while texts := self._read(rows):
                after, read = ds.state_dict(), read + len(texts)
                rng = np.random.default_rng([self.seed, c["epoch"], self.lane, c["window"]])
                texts = [texts[i] for i in rng.permutation(len(texts))]
                first, size = c["doc"], 1
                while first < len(texts):  # batches of 1, 2, 4 ... documents: the first block comes quickly
                    encoded = self._encode(texts[first: first + size])
                    for i, enc in enumerate(encoded, start=first):
                        ids = np.asarray([*enc.ids, self.tok.eos_token_id], dtype=np.int64)
                        pos = c["token"] if i == c["doc"] else 0
                        while pos < len(ids):  # pack: cut a block whenever the buffer holds width tokens
                            take = min(self.width - filled, len(ids) - pos)
                            buffer.append(ids[pos: pos + take])
                            filled, pos = filled + take, pos + take
                            if filled == self.width:
                                block, buffer, filled = np.concatenate(buffer), [], 0
                                self.cursor = _normalized(c, state, after, i, pos, len(ids), len(texts))
                                yield block
                    first, size = first + len(encoded), min(2 * size, ENCODE_BATCH)
                c.update(state=after, window=c["window"] + 1, doc=0, token=0)
                state = after
            if read == 0 and fresh:
                raise StreamError(f"lane {self.lane} of the stream holds no training document: lower "
                                  "data.stream_lanes, or use a corpus with more files")
            c = {"epoch": c["epoch"] + 1, "state": None, "window": 0, "doc": 0, "token": 0}

    def _read(self, rows) -> list[str]:
        """The next window's texts; a read that fails (a bad file met mid-run) becomes the named error."""
        try:
            return [row["text"] for _, row in zip(range(self.window), rows)]
        except Exception as err:  # noqa: BLE001  (datasets and pyarrow raise many types for unreadable input)
            raise self.read_error(err) from err


def _normalized(c: dict, state, after, doc: int, pos: int, doc_len: int, window_len: int) -> dict:
    """The cursor of the next block, moved past the end of a finished document (or window)."""
    if pos < doc_len:
        return {"epoch": c["epoch"], "state": state, "window": c["window"], "doc": doc, "token": pos}
    if doc + 1 < window_len:
        return {"epoch": c["epoch"], "state": state, "window": c["window"], "doc": doc + 1, "token": 0}
    return {"epoch": c["epoch"], "state": after, "window": c["window"] + 1, "doc": 0, "token": 0}


class StreamingSampleLoader:
    """The loader contract over lanes of a stream (module doc): `ordinal` is the position, skip lists key on
    ordinals, and `state_dict()` adds the lanes' cursors so that `load_state_dict` resumes in O(1)."""

    def __init__(self, docs, tok, seq_len: int, seed: int, window: int, lanes: int, read_error=None):
        self.docs, self.tok, self.seq_len, self.seed, self.window, self.lanes = docs, tok, seq_len, seed, window, lanes
        self.read_error = read_error
        if docs.n_shards % lanes:
            raise StreamError(
                f"the stream has {docs.n_shards} file shard(s), which data.stream_lanes={lanes} does not divide: a "
                "lane must own whole files to read only its share and resume in O(1). Set data.stream_lanes to a "
                f"divisor of {docs.n_shards}, or `llmstable prepare` the corpus and train with data=prepared"
            )
        self.ordinal = 0
        self.skip = SkipList()  # owned by the trainer; applied in whole rounds of `lanes` ordinals
        self._cursors: dict[int, dict] = {}
        self._streams: dict[int, tuple[LaneStream, int]] = {}  # lane -> (stream, lane-local index of its next block)

    def _lane(self, lane: int) -> LaneStream:
        if lane not in self._streams:
            from datasets.distributed import split_dataset_by_node

            cursor = self._cursors.get(lane)
            def open_lane():  # this lane's files only
                return split_dataset_by_node(self.docs, rank=lane, world_size=self.lanes)

            stream = LaneStream(open_lane, self.tok, self.seq_len, self.seed, lane, self.window,
                                cursor and cursor["cursor"], self.read_error)
            self._streams[lane] = (stream, cursor["index"] if cursor else 0)
        return self._streams[lane][0]

    def _block(self, lane: int, index: int) -> np.ndarray:
        stream = self._lane(lane)
        _, position = self._streams[lane]
        if index < position:
            raise StreamError(f"lane {lane} was asked for block {index} after block {position}: a stream only moves on")
        for _ in range(index - position):  # skipped rounds: read and dropped
            next(stream)
        self._streams[lane] = (stream, index + 1)
        return next(stream)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[int]]:
        return self.next_share(batch_size, 0, batch_size)

    def next_share(self, count: int, start: int, stop: int) -> tuple[torch.Tensor, list[int]]:
        """Advance past one global batch of `count` samples (whole rounds) and return this rank's share: the
        blocks of the lanes it owns, rank start // (stop - start) of count // (stop - start)."""
        share = stop - start
        if count % self.lanes or count % share or self.lanes % (count // share):
            raise StreamError(
                f"data.stream_lanes={self.lanes} must divide the global batch ({count}) and be a multiple of the "
                f"world size ({count // share if share else '?'}): set data.stream_lanes accordingly (e.g. the world "
                "size)"
            )
        world, rank = count // share, start // share
        per_rank = self.lanes // world
        mine = range(rank * per_rank, (rank + 1) * per_rank)
        rounds, self.ordinal = _next_rounds(self.ordinal, count // self.lanes, self.lanes, self.skip)
        rows = [self._block(lane, r) for r in rounds for lane in mine]
        return torch.from_numpy(np.stack(rows)), [r * self.lanes + lane for r in rounds for lane in mine]

    def state_dict(self) -> dict:
        """The ordinal and the cursors of every lane. Under several ranks each rank holds only its own lanes'
        cursors, so this gathers them: every rank must call it (the trainer does, in trainer_state)."""
        local = {str(lane): {"index": pos, "cursor": stream.cursor} for lane, (stream, pos) in self._streams.items()}
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            local = {k: v for part in gathered for k, v in part.items()}
        return {"ordinal": self.ordinal, "lanes": local}

    def load_state_dict(self, state: dict) -> None:
        self.ordinal = int(state["ordinal"])
        if "lanes" not in state and self.ordinal > 0:
            raise StreamError("this checkpoint has no stream cursors (it predates O(1) streaming resume): resume it "
                              "with the llmstable version that wrote it, or start a new run")
        self._cursors = {int(k): v for k, v in state.get("lanes", {}).items()}
        self._streams = {}


def _next_rounds(ordinal: int, count: int, lanes: int, skip: SkipList) -> tuple[list[int], int]:
    """The next `count` rounds (of `lanes` ordinals each) from `ordinal` that hold no skipped ordinal, and the
    ordinal after them."""
    rounds, r = [], -(-ordinal // lanes)
    while len(rounds) < count:
        if not any(a < (r + 1) * lanes and r * lanes < b for a, b in skip.ranges):
            rounds.append(r)
        r += 1
    return rounds, r * lanes


def build_stream_data(cfg: DataConfig, seed: int, min_train_blocks: int):
    """A DataBundle whose train loader streams (module doc); validation blocks are the first val_max_blocks of
    the validation documents, read once at start."""
    from llmstable.data.corpus import cache_root, corpus_read_error, load_corpus
    from llmstable.data.packing import DataBundle, encode_stream, pack_stream
    from llmstable.data.tokenizer import build_tokenizer

    if cfg.tokenizer.kind == "bpe":
        raise DataError(
            "data.tokenizer.kind=bpe trains on the whole training split, which a stream does not have: with "
            "data.streaming=true use data.tokenizer.kind=hf (e.g. name_or_path=t5-base)"
        )
    if min_train_blocks % cfg.stream_lanes:
        raise StreamError(f"data.stream_lanes={cfg.stream_lanes} must divide train.global_batch_size="
                          f"{min_train_blocks}: each global batch takes the same number of blocks from every lane")
    corpus = load_corpus(cfg)
    tok = build_tokenizer(cfg.tokenizer, iter(()), corpus.fingerprint, cache_root(cfg))

    def read_error(err: Exception) -> DataError:  # (a bad file met while reading: named with its line)
        return corpus_read_error(cfg, err)

    train = StreamingSampleLoader(corpus.train, tok, cfg.seq_len, seed, cfg.shuffle_buffer, cfg.stream_lanes,
                                  read_error)
    try:
        val_ids = encode_stream(tok, (row["text"] for row in corpus.val))
        val_rows = [b for _, b in zip(range(cfg.val_max_blocks), pack_stream(val_ids, cfg.seq_len))]
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001  (datasets and pyarrow raise many types for unreadable input)
        raise read_error(err) from err
    if not val_rows:
        raise DataError(f"the validation documents of data.path={cfg.path!r} hold fewer than data.seq_len + 1 = "
                        f"{cfg.seq_len + 1} tokens: raise data.val_fraction or lower data.seq_len")
    return DataBundle(tok, train, torch.from_numpy(np.stack(val_rows)), len(tok), None)
