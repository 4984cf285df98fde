"""How work is cut into Ray Data actor calls."""

from __future__ import annotations

import pytest

from latentforge.raycluster import block_sizes


@pytest.mark.parametrize(("n", "workers"), [(79, 1), (79, 2), (100, 4), (5, 1), (1, 1), (2, 3)])
def test_block_sizes_cover_every_item_in_even_blocks_then_shrinking_ones(n, workers):
    sizes = block_sizes(n, workers, calls_per_actor=8)
    assert sum(sizes) == n and min(sizes) >= 1
    assert max(sizes) == -(-n // (8 * workers))  # no block above the even share
    assert sizes == sorted(sizes, reverse=True)  # full blocks first, the tail shrinks
    assert sizes[-1] == 1  # the last call, which nothing overlaps, is one item


def test_block_sizes_of_the_default_cache_run():
    # 20k images in 256-image batches on one actor: 7 full blocks of 10, then 5, 2, 1, 1
    # (the last call was a full 10-batch block before: tiny encoder, the tail after it measured
    # 70-90 ms then, 45-58 ms now).
    assert block_sizes(79, 1, calls_per_actor=8) == [10] * 7 + [5, 2, 1, 1]
    assert block_sizes(0, 2, calls_per_actor=8) == []
