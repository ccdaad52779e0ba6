"""Streaming by lanes: exact resume from a cursor (no replay), each rank reading only its own files."""

from __future__ import annotations

import json

import pytest
import torch

from llmstable.data import DataError, build_data
from llmstable.data.stream import StreamError, StreamingSampleLoader
from tests.data.corpora import hf_files_cfg


class CountingTokenizer:
    """The tokenizer the loader is given, recording every document it encodes."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []
        self.eos_token_id = tok.eos_token_id
        self.backend_tokenizer = self

    def encode_batch(self, texts, add_special_tokens=False):
        self.seen.extend(texts)
        return self.tok.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)


def stream_cfg(jsonl_dir, tokenizer_dir, **kw):
    kw.setdefault("stream_lanes", 2)
    return hf_files_cfg(jsonl_dir / "*.json.gz", tokenizer_dir, streaming=True, shuffle_buffer=6, val_fraction=0.1,
                        **kw)


def loader(cfg, seed=0) -> StreamingSampleLoader:
    data = build_data(cfg, seed=seed, min_train_blocks=4)
    data.train.tok = CountingTokenizer(data.train.tok)
    return data.train


@pytest.mark.parametrize("consumed", [3, 600])  # 600 batches of 16: past the end of the corpus, into epoch 2
def test_a_resumed_stream_gives_the_uninterrupted_blocks_without_replaying_it(jsonl_dir, tokenizer_dir, consumed):
    cfg = stream_cfg(jsonl_dir, tokenizer_dir, seq_len=64)
    reference = loader(cfg)
    for _ in range(consumed):
        reference.next_batch(16)
    state = json.loads(json.dumps(reference.state_dict()))  # as it travels in state.json
    assert [lane["cursor"]["epoch"] for lane in state["lanes"].values()] == [int(consumed == 600)] * 2
    expected = [reference.next_batch(4) for _ in range(6)]
    resumed = loader(cfg)
    resumed.load_state_dict(state)
    for rows, ordinals in expected:
        got_rows, got_ordinals = resumed.next_batch(4)
        assert torch.equal(got_rows, rows) and got_ordinals == ordinals
    # O(1): the resumed loader tokenized about one window per lane, not the stream up to the position.
    assert len(resumed.tok.seen) <= 2 * (6 + 6)  # lanes x (the current window + the next)
    if consumed == 600:
        assert len(reference.tok.seen) > 4 * 2 * (6 + 6)


def test_two_ranks_read_disjoint_documents_and_together_serve_the_one_process_batches(jsonl_dir, tokenizer_dir):
    cfg = stream_cfg(jsonl_dir, tokenizer_dir)
    single, ranks = loader(cfg), [loader(cfg), loader(cfg)]
    for _ in range(8):
        rows, ordinals = single.next_share(8, 0, 8)
        shares = [ranks[r].next_share(8, 4 * r, 4 * r + 4) for r in range(2)]
        got = dict(zip(shares[0][1] + shares[1][1], torch.cat([shares[0][0], shares[1][0]])))
        assert sorted(got) == sorted(ordinals)
        for row, o in zip(rows, ordinals):
            assert torch.equal(got[o], row)
    read = [set(r.tok.seen) for r in ranks]
    assert read[0] and read[1] and read[0].isdisjoint(read[1])
    assert len(ranks[0].tok.seen) + len(ranks[1].tok.seen) == len(single.tok.seen)


def test_a_skipped_range_skips_whole_rounds_and_the_rest_keep_their_order(jsonl_dir, tokenizer_dir):
    from llmstable.data.loader import SkipList

    cfg = stream_cfg(jsonl_dir, tokenizer_dir)
    plain = loader(cfg)
    reference = {o: row for _ in range(4) for row, o in zip(*plain.next_batch(4))}
    skipping = loader(cfg)
    skipping.skip = SkipList([[3, 5]])  # ordinals 3 and 4: rounds 1 and 2 (of 2 lanes) are left out whole
    rows, ordinals = skipping.next_batch(4)
    assert ordinals == [0, 1, 6, 7]
    for row, o in zip(rows, ordinals):
        assert torch.equal(row, reference[o])


def test_lanes_that_do_not_divide_the_files_are_refused_with_the_fix(jsonl_dir, tokenizer_dir):
    with pytest.raises(StreamError, match=r"8 file shard\(s\), which data.stream_lanes=3 does not divide.*prepare"):
        build_data(stream_cfg(jsonl_dir, tokenizer_dir, stream_lanes=3), seed=0, min_train_blocks=3)


def test_lanes_that_do_not_divide_the_batch_are_refused(jsonl_dir, tokenizer_dir):
    with pytest.raises(DataError, match=r"data.stream_lanes=4 must divide train.global_batch_size=6"):
        build_data(stream_cfg(jsonl_dir, tokenizer_dir, stream_lanes=4), seed=0, min_train_blocks=6)


def test_the_window_order_depends_on_the_seed(jsonl_dir, tokenizer_dir):
    cfg = stream_cfg(jsonl_dir, tokenizer_dir)
    a, b = loader(cfg, seed=0).next_batch(8)[0], loader(cfg, seed=1).next_batch(8)[0]
    assert not torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_rank_streaming_follows_the_one_process_curve_and_its_checkpoint_resumes_on_one(tmp_path, tokenizer_dir,
                                                                                           jsonl_dir):
    from tests.conftest import TINY
    from tests.parallel.launch import run_ranks
    from tests.parallel.test_distributed import assert_close, losses, rewind

    stream = ["data=local_files", f"data.path={jsonl_dir}/*.json.gz", "data.format=jsonl", "data.streaming=true",
              "data.tokenizer.kind=hf", f"data.tokenizer.name_or_path={tokenizer_dir}", "data.stream_lanes=2",
              "data.shuffle_buffer=6", "data.val_fraction=0.1"]
    common = [*TINY, *stream, "train.max_steps=6", "train.checkpoint_interval=3"]
    single, two = tmp_path / "single", tmp_path / "two"
    run_ranks(1, [*common, "distributed=single"], single)
    run_ranks(2, [*common, "distributed=ddp"], two)  # each rank reads the files of its own lane
    assert_close(losses(two), losses(single))
    rewind(two, 3)  # the lanes' cursors were gathered from both ranks into the step-3 checkpoint
    run_ranks(1, [*common, "distributed=single"], two)
    assert_close(losses(two), losses(two, first=True), steps=range(4, 7))
