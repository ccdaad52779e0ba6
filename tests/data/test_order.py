"""Epoch order: numpy's permutation up to a size, a constant-memory keyed permutation beyond it."""

import numpy as np
import pytest

from llmstable.data import order
from llmstable.data.order import EpochOrder, FeistelPermutation, epoch_permutation


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_the_feistel_order_is_a_permutation_of_every_size(n):
    values = FeistelPermutation(n, seed=7, epoch=0)(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))


def test_the_feistel_order_is_a_function_of_seed_and_epoch():
    n = 10_000
    a = FeistelPermutation(n, 1, 0)(np.arange(n))
    assert np.array_equal(a, FeistelPermutation(n, 1, 0)(np.arange(n)))
    assert not np.array_equal(a, FeistelPermutation(n, 1, 1)(np.arange(n)))
    assert not np.array_equal(a, FeistelPermutation(n, 2, 0)(np.arange(n)))
    # well mixed: neighbours in position land far apart, and the first tenth covers the whole range
    assert np.median(np.abs(np.diff(a))) > n / 10 and a[: n // 10].max() > 0.9 * n


def test_small_corpora_keep_numpy_s_permutation_and_large_ones_switch_without_holding_one(monkeypatch):
    small = EpochOrder(500, seed=3)
    assert [small(o) for o in range(500, 1000)] == epoch_permutation(500, 3, 1).tolist()
    monkeypatch.setattr(order, "FULL_PERMUTATION_MAX_BLOCKS", 100)
    large = EpochOrder(500, seed=3)
    served = [large(o) for o in range(500)]
    assert sorted(served) == list(range(500)) and served != epoch_permutation(500, 3, 0).tolist()
    assert isinstance(large._perm, FeistelPermutation)
