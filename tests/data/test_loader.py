import numpy as np
import pytest
import torch

from llmstable.data.loader import SampleLoader, encode_stream, pack_blocks, pack_stream


class CharTokenizer:
    """A stand-in with the HF call signature: one id per character, EOS = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def __len__(self):
        return 256


def test_packing_joins_documents_with_eos_and_cuts_seq_len_plus_one_blocks():
    tokens = np.concatenate(list(encode_stream(CharTokenizer(), ["abc", "de", "fghij"])))
    assert tokens.tolist() == [97, 98, 99, 0, 100, 101, 0, 102, 103, 104, 105, 106, 0]
    blocks = pack_blocks(tokens, seq_len=3)
    assert blocks.shape == (3, 4)
    assert blocks[1].tolist() == [100, 101, 0, 102]
    streamed = list(pack_stream(encode_stream(CharTokenizer(), ["abc", "de", "fghij"]), seq_len=3))
    assert np.array_equal(np.stack(streamed), blocks)


def test_every_block_appears_once_per_epoch_in_a_seeded_order():
    blocks = np.arange(50 * 5).reshape(50, 5)
    loader = SampleLoader(blocks, seed=3)
    first, ordinals = loader.next_batch(50)
    assert ordinals == list(range(50))
    assert sorted(first[:, 0].tolist()) == list(range(0, 250, 5))
    second, _ = loader.next_batch(50)
    assert sorted(second[:, 0].tolist()) == sorted(first[:, 0].tolist())
    assert not torch.equal(first, second)  # a new permutation each epoch


def test_same_seed_same_order_different_seed_different_order():
    blocks = np.arange(40 * 3).reshape(40, 3)
    a = SampleLoader(blocks, seed=1).next_batch(40)[0]
    b = SampleLoader(blocks, seed=1).next_batch(40)[0]
    c = SampleLoader(blocks, seed=2).next_batch(40)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("consumed", [0, 7, 39, 40, 95])
def test_restoring_the_position_gives_the_same_next_batches(consumed):
    blocks = np.arange(40 * 3).reshape(40, 3)
    reference = SampleLoader(blocks, seed=5)
    for _ in range(consumed):
        reference.next_batch(1)
    state = reference.state_dict()
    assert state == {"ordinal": consumed}
    expected = [reference.next_batch(6)[0] for _ in range(10)]
    restored = SampleLoader(blocks, seed=5)
    restored.load_state_dict(state)
    for want in expected:
        assert torch.equal(restored.next_batch(6)[0], want)


def test_skipped_ordinals_are_never_served_and_the_rest_keep_their_order():
    from llmstable.data.loader import SkipList

    blocks = np.arange(30 * 3).reshape(30, 3)
    plain = SampleLoader(blocks, seed=4)
    reference = [plain.next_batch(1)[0] for _ in range(20)]
    loader = SampleLoader(blocks, seed=4)
    loader.skip = SkipList([[3, 6], [10, 11]])
    batch, ordinals = loader.next_batch(12)
    assert ordinals == [0, 1, 2, 6, 7, 8, 9, 11, 12, 13, 14, 15]
    for row, o in zip(batch, ordinals):
        assert torch.equal(row, reference[o][0])
    assert len(loader.skip) == 4 and 4 in loader.skip and 6 not in loader.skip


def test_skip_ranges_merge():
    from llmstable.data.loader import SkipList

    skip = SkipList()
    skip.add(10, 20)
    skip.add(15, 30)
    skip.add(40, 41)
    assert skip.ranges == [[10, 30], [40, 41]] and len(skip) == 21
