"""Padding-aware grouping keeps every text, respects its bounds, and limits padding."""
from hypothesis import given, settings, strategies as st

from siren_runtime.batching import length_groups


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=200), st.integers(1, 40), st.integers(1, 5000),
       st.floats(0.0, 1.0))
def test_groups_cover_and_respect_bounds(lengths, max_batch, budget, max_padding):
    groups = length_groups(lengths, max_batch, budget, max_padding)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        if len(g) > 1:
            padded = len(g) * longest
            assert len(g) <= max_batch and padded <= budget
            assert padded - sum(lengths[i] for i in g) <= max_padding * padded + 1e-9


def test_mixed_lengths_are_not_padded_to_the_longest():
    lengths = [5, 160, 7, 150, 6, 155]
    groups = length_groups(lengths, 32, 16384, 0.25)
    assert sorted(map(sorted, groups)) == [[0, 2, 4], [1, 3, 5]]
