"""greedy_partition: the paper's Algorithm 1 on hand-worked examples and its properties."""

import random

import pytest

from fp8.zero import greedy_partition, rank_loads


def test_hand_worked_examples():
    # Sorted: 10 (t1) -> r0, 7 (t3) -> r1, 5 (t0) -> r1 (7 < 10), 3 (t2) -> r0 (10 < 12).
    assert greedy_partition([5, 10, 3, 7], 2) == [1, 0, 0, 1]
    # Equal sizes: ties go to the lowest rank, and equal tensors keep their order.
    assert greedy_partition([4, 4, 4, 4], 3) == [0, 1, 2, 0]
    assert greedy_partition([], 4) == []
    assert greedy_partition([9, 1], 1) == [0, 0]
    # More ranks than tensors: some ranks own nothing.
    assert rank_loads([8, 2], greedy_partition([8, 2], 4), 4) == [8, 2, 0, 0]


@pytest.mark.parametrize("seed", range(20))
def test_every_tensor_once_and_the_bound_of_the_greedy_rule(seed):
    rng = random.Random(seed)
    ranks = rng.randint(1, 9)
    sizes = [rng.choice([rng.randint(1, 100), rng.randint(1000, 50000)]) for _ in range(rng.randint(1, 60))]
    owners = greedy_partition(sizes, ranks)
    assert len(owners) == len(sizes) and all(0 <= o < ranks for o in owners)
    loads = rank_loads(sizes, owners, ranks)
    assert sum(loads) == sum(sizes)
    # The largest load exceeds the ideal share by at most the largest tensor.
    assert max(loads) <= sum(sizes) / ranks + max(sizes)


def test_bad_input():
    with pytest.raises(ValueError, match="at least one rank"):
        greedy_partition([1], 0)
    with pytest.raises(ValueError, match="non-negative"):
        greedy_partition([1, -2], 2)
