"""datumdb.pipeline.splits: shard ranges, shard ids and the (shard-independent) split assignment."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from datumdb.errors import InputError
from datumdb.keys import index_key
from datumdb.pipeline.splits import (
    SPLITS,
    assign_splits,
    check_shard_ids,
    positions_in_split,
    shard_range,
    split_counts,
)

pytestmark = pytest.mark.unit


@given(count=st.integers(0, 5000), shards=st.integers(1, 40))
def test_shard_ranges_tile_the_indices(count: int, shards: int) -> None:
    ranges = [shard_range(s, shards, count) for s in range(shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_a_shard_outside_the_ids_is_refused() -> None:
    for shard in (-1, 3):
        with pytest.raises(InputError, match=r"shard .* is not in 0\.\.2"):
            shard_range(shard, 3, 10)


def test_shard_ids_must_be_zero_to_n_minus_one() -> None:
    assert check_shard_ids([0, 1, 2]) == 3
    assert check_shard_ids((0,)) == 1
    for bad in ([], [1, 2], [0, 2], [0, 0], [1, 0]):
        with pytest.raises(InputError, match=r"0, 1, \.\.\., n-1"):
            check_shard_ids(bad)


def test_assignment_has_exact_counts_and_is_a_pure_function_of_its_inputs() -> None:
    a = assign_splits(1000, 5, (0.8, 0.1, 0.1))
    assert a.dtype == np.int8 and a.shape == (1000,)
    assert np.array_equal(a, assign_splits(1000, 5, (0.8, 0.1, 0.1)))
    assert np.bincount(a).tolist() == [800, 100, 100]
    assert not np.array_equal(a, assign_splits(1000, 6, (0.8, 0.1, 0.1)))
    assert split_counts(7, (0.5, 0.25, 0.25)) == (4, 2, 1)


@given(
    count=st.integers(3, 400),
    seed=st.integers(0, 2**32 - 1),
    train=st.floats(0.05, 0.9),
    val_share=st.floats(0.05, 0.95),
)
def test_assignment_counts_match_split_counts(count: int, seed: int, train: float, val_share: float) -> None:
    val = (1 - train) * val_share
    fractions = (train, val, 1 - train - val)
    try:
        counts = split_counts(count, fractions)
    except InputError as exc:  # only ever because a split would be empty
        assert "would be empty" in str(exc)
        assert min(round(count * train), round(count * val), count - round(count * train) - round(count * val)) < 1
        return
    assert counts[0] == round(count * train) and counts[1] == round(count * val) and sum(counts) == count
    assignment = assign_splits(count, seed, fractions)
    assert np.bincount(assignment, minlength=3).tolist() == list(counts)


def test_positions_count_members_in_index_order() -> None:
    assignment = np.array([0, 1, 0, 2, 0, 1], dtype=np.int8)
    assert positions_in_split(assignment).tolist() == [0, 0, 1, 0, 2, 1]


@given(count=st.integers(10, 300), seed=st.integers(0, 1000), shards=st.integers(1, 12))
def test_concatenated_shards_give_each_split_its_keys_in_sorted_order(count: int, seed: int, shards: int) -> None:
    """What lets the single writer append shard after shard: keys 0..n-1 of each split, sorted."""
    assignment = assign_splits(count, seed, (0.6, 0.2, 0.2))
    positions = positions_in_split(assignment)
    sizes = np.bincount(assignment, minlength=3)
    for split in range(len(SPLITS)):
        keys = []
        for shard in range(shards):
            start, stop = shard_range(shard, shards, count)
            keys += [
                index_key(int(positions[i]), int(sizes[split])) for i in range(start, stop) if assignment[i] == split
            ]
        assert keys == [index_key(p, int(sizes[split])) for p in range(int(sizes[split]))]
        assert keys == sorted(keys)


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.8, 0.1, 0.2), "sum to 1"),
        ((1.0, 0.0, 0.0), "must be > 0"),
        ((0.5, 0.6, -0.1), "must be > 0"),
        ((0.5, 0.5), "need 3 split fractions"),
        ((0.4, 0.2, 0.2, 0.2), "need 3 split fractions"),
    ],
)
def test_bad_fractions_are_rejected_by_name(fractions: tuple[float, ...], message: str) -> None:
    with pytest.raises(InputError, match=message):
        assign_splits(100, 0, fractions)


def test_a_split_that_would_be_empty_is_an_error() -> None:
    with pytest.raises(InputError, match="'val' would be empty"):
        assign_splits(4, 0, (0.9, 0.05, 0.05))
    with pytest.raises(InputError, match="'test' would be empty"):
        split_counts(2, (0.5, 0.3, 0.2))
