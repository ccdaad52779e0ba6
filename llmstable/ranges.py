"""Half-open ranges [start, end) of sample ordinals, kept sorted and merged: the spike guard's skip list, as the
rollback policy books it (llmstable.recovery) and the loader serves around it (llmstable.data.packing)."""

from __future__ import annotations


def add_range(ranges: list, start: int, end: int) -> list[list[int]]:
    """`ranges` with [start, end) added, sorted and merged (overlapping or touching ranges become one)."""
    merged: list[list[int]] = []
    for a, b in sorted([*([int(x), int(y)] for x, y in ranges), [int(start), int(end)]]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged
