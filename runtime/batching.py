"""Padding-aware grouping: sort by token length and cut groups under a token budget,
so a short text is never padded to the longest one in a large batch."""
from __future__ import annotations


def length_groups(lengths: list[int], max_batch: int, token_budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped so each group's padded size (rows x longest)
    stays within `token_budget` and `max_batch` rows (a single long text always fits)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # ascending order: the newcomer is the longest
        if current and (len(current) + 1 > max_batch or (len(current) + 1) * longest > token_budget):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups
