"""Shard ranges, the split assignment and the record and shard files."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from datumdb.errors import InputError
from datumdb.shards import (
    assign_splits,
    check_shard_ids,
    positions_in_split,
    read_records,
    read_shard,
    shard_range,
    split_counts,
    write_records,
    write_shard,
)


@given(count=st.integers(0, 5000), shards=st.integers(1, 40))
def test_shard_ranges_tile_the_indices(count: int, shards: int) -> None:
    ranges = [shard_range(s, shards, count) for s in range(shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_shard_ids_must_be_zero_to_n_minus_one() -> None:
    assert check_shard_ids([0, 1, 2]) == 3
    for bad in ([], [1, 2], [0, 2], [0, 0], [1, 0]):
        with pytest.raises(InputError, match=r"0, 1, \.\.\., n-1"):
            check_shard_ids(bad)


def test_assignment_has_exact_counts_and_is_a_pure_function_of_its_inputs() -> None:
    a = assign_splits(1000, 5, (0.8, 0.1, 0.1))
    assert np.array_equal(a, assign_splits(1000, 5, (0.8, 0.1, 0.1)))
    assert np.bincount(a).tolist() == [800, 100, 100]
    assert not np.array_equal(a, assign_splits(1000, 6, (0.8, 0.1, 0.1)))
    assert split_counts(7, (0.5, 0.25, 0.25)) == (4, 2, 1)


def test_positions_count_members_in_index_order() -> None:
    assignment = np.array([0, 1, 0, 2, 0, 1], dtype=np.int8)
    assert positions_in_split(assignment).tolist() == [0, 0, 1, 0, 2, 1]


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.8, 0.1, 0.2), "sum to 1"),
        ((1.0, 0.0, 0.0), "must be > 0"),
        ((0.5, 0.5), "three|3 split fractions"),
    ],
)
def test_bad_fractions_are_rejected_by_name(fractions: tuple[float, ...], message: str) -> None:
    with pytest.raises(InputError, match=message):
        assign_splits(100, 0, fractions)


def test_a_split_that_would_be_empty_is_an_error() -> None:
    with pytest.raises(InputError, match="'val' would be empty"):
        assign_splits(4, 0, (0.9, 0.05, 0.05))


def test_record_file_round_trip_and_damage(tmp_path: Path) -> None:
    items = [(b"%08d" % i, bytes([i]) * (i + 1)) for i in range(5)]
    path = write_records(tmp_path / "r" / "train.rec", {"split": "train"}, items)
    header, records = read_records(path)
    assert header["split"] == "train" and list(records) == items
    assert [p.name for p in path.parent.iterdir()] == ["train.rec"]  # no temporary file left
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    with pytest.raises(InputError, match=r"truncated|trailer"):
        list(read_records(path)[1])
    path.write_bytes(b"not a record file")
    with pytest.raises(InputError, match="not a datumdb record file"):
        read_records(path)
    with pytest.raises(InputError, match="not found"):
        read_records(tmp_path / "missing.rec")


def test_shard_folder_round_trip_is_byte_stable(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    labels = np.array([1, 0])
    meta = {"start": 10, "stop": 12, "count": 20, "shape": [3, 4, 5], "shard": 1}
    write_shard(tmp_path / "a", images, labels, meta)
    write_shard(tmp_path / "b", images, labels, meta)
    for name in ("images.npy", "labels.npy", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    got_images, got_labels, got_meta = read_shard(tmp_path / "a")
    assert np.array_equal(got_images, images) and got_labels.tolist() == [1, 0] and got_meta["count"] == 20
    with pytest.raises(InputError, match="not found"):
        read_shard(tmp_path / "missing")
