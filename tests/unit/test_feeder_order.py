"""Which shard a Blob feeder fetches from next: shard after shard (width 1), or, for shards each
checked by one sequential Content-MD5, side by side, so as many hashes run at once."""

from __future__ import annotations

from blob2gpu.sources.azure.feeder import next_side_by_side


def test_width_one_is_shard_after_shard():
    assert next_side_by_side([3, 4, 5], {3: 6}, 1) == 3


def test_side_by_side_takes_the_shard_with_fewest_ranges_in_flight():
    # Shards 0..3 queued, in the order their headers were read.
    assert next_side_by_side([0, 1, 2, 3], {}, 4) == 0
    assert next_side_by_side([0, 1, 2, 3], {0: 1}, 4) == 1
    assert next_side_by_side([0, 1, 2, 3], {0: 1, 1: 1, 2: 1, 3: 1}, 4) == 0  # earliest of a tie
    assert next_side_by_side([0, 1, 2, 3], {0: 2, 1: 1, 2: 2}, 4) == 3
    # Only the first `width` shards: the fifth waits though it has nothing in flight.
    assert next_side_by_side([0, 1, 2, 3, 4], {0: 1, 1: 1, 2: 1, 3: 1}, 4) == 0


def test_nothing_queued():
    assert next_side_by_side([], {}, 4) is None
