"""The order of the blocks in each epoch: a permutation drawn from (seed, epoch).

Up to FULL_PERMUTATION_MAX_BLOCKS blocks (about 1B tokens at seq_len 256) the permutation is numpy's
`default_rng([seed, epoch]).permutation(n)`, held in memory (8 bytes a block, at most 32 MB): the order every run
so far has used. Above that, holding it would grow with the corpus (27B tokens at seq_len 256 are 105M blocks,
840 MB on every rank), so the position is mapped through a keyed Feistel network instead: a bijection of
[0, 2^2k) with 2^2k >= n, restricted to [0, n) by cycle walking (apply it again until the value falls inside,
fewer than 4 times on average since 2^2k < 4n). It is computed per lookup, in constant memory, and is just as
much a function of (seed, epoch, position) alone, so resume, skip lists and world sizes behave the same.
"""

from __future__ import annotations

import numpy as np

FULL_PERMUTATION_MAX_BLOCKS = 1 << 22
_ROUNDS = 6
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class FeistelPermutation:
    """A pseudo-random permutation of range(n) keyed by (seed, epoch), evaluated pointwise."""

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2  # each Feistel half has `half` bits, so the domain is 2^(2 half) >= n
        self.keys = np.random.default_rng([seed, epoch, 0xFE]).integers(0, 2**63, size=_ROUNDS, dtype=np.uint64)

    def _round(self, x: np.ndarray, key: np.uint64) -> np.ndarray:
        # splitmix64's finalizer on (x + key): a well-mixed 64-bit function, truncated to `half` bits.
        with np.errstate(over="ignore"):
            z = (x + key) & _MASK64
            z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
            z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
            z ^= z >> np.uint64(31)
        return z & np.uint64((1 << self.half) - 1)

    def _once(self, x: np.ndarray) -> np.ndarray:
        mask = np.uint64((1 << self.half) - 1)
        left, right = x >> np.uint64(self.half), x & mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << np.uint64(self.half)) | right

    def __call__(self, positions) -> np.ndarray:
        x = self._once(np.asarray(positions, dtype=np.uint64))
        outside = x >= self.n
        while outside.any():  # cycle walking: stays a bijection of range(n)
            x[outside] = self._once(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


class EpochOrder:
    """block(ordinal) -> the block index that ordinal reads: position ordinal % n of epoch ordinal // n."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, ordinal: int) -> int:
        epoch, offset = divmod(ordinal, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = (epoch_permutation(self.n, self.seed, epoch) if self.n <= FULL_PERMUTATION_MAX_BLOCKS
                          else FeistelPermutation(self.n, self.seed, epoch))
        if isinstance(self._perm, np.ndarray):
            return int(self._perm[offset])
        return int(self._perm([offset])[0])
