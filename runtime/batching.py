"""Padding-aware grouping: sort by token length and cut groups so a short text is never
padded to the longest one in a large batch.

Every padded token costs as much as a real one, so groups are closed when they would
exceed the row limit, the token budget (bounded memory), or a share of padding.
"""
from __future__ import annotations


def length_groups(lengths: list[int], max_batch: int, token_budget: int,
                  max_padding: float = 1.0, pad_free_width: int = 0) -> list[list[int]]:
    """Indices of `lengths` grouped so each group's padded size (rows x longest) stays
    within `token_budget` and `max_batch` rows and at most `max_padding` of its tokens
    are padding (a single long text always forms a group of its own). Groups no wider
    than `pad_free_width` ignore the padding share: streaming steps of a few tokens cost
    the engine call and the past, not the padded new tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        longest = lengths[i]  # ascending order: the newcomer is the longest
        if current:
            rows = len(current) + 1
            padded = rows * longest
            if (rows > max_batch or padded > token_budget
                    or (longest > pad_free_width and padded - (real + longest) > max_padding * padded)):
                groups.append(current)
                current, real = [], 0
        current.append(i)
        real += longest
    if current:
        groups.append(current)
    return groups
