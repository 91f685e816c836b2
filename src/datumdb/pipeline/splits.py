"""Shards and splits: how one dataset is cut into pieces that parallel jobs can make alone.

* **Shard ranges.** Shard ``s`` of ``n`` holds the contiguous global indices
  ``[s*count//n, (s+1)*count//n)``; every job computes its own range from the count.
* **Split assignment** is a pure function of ``(count, seed, fractions)``: a seeded permutation
  gives exactly ``round(count * fraction)`` samples to train and to val, the rest to test. No job
  has to read another job's output to know where a sample goes, and the assignment does not
  depend on the number of shards.
* **Keys** are :func:`datumdb.keys.index_key` of the sample's position within its split, in
  global-index order, so concatenating the shards' record files in shard order yields sorted keys
  for the single LMDB append writer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from datumdb.errors import InputError

__all__ = ["SPLITS", "assign_splits", "check_shard_ids", "positions_in_split", "shard_range", "split_counts"]

SPLITS = ("train", "val", "test")
_SPLIT_TAG = 0x5B117  # separates the split permutation from other streams seeded with `seed`


def check_shard_ids(shards: Sequence[int]) -> int:
    """The number of shards, after checking the ids are exactly ``0, 1, ..., n-1``.

    The params hold the list (DVC's ``foreach`` needs a list); its length is the count.
    """
    ids = [int(s) for s in shards]
    if not ids or ids != list(range(len(ids))):
        raise InputError(f"shards must be the list 0, 1, ..., n-1 (n >= 1), got {list(shards)}")
    return len(ids)


def shard_range(shard: int, shards: int, count: int) -> tuple[int, int]:
    """Global index range ``[start, stop)`` of ``shard`` out of ``shards`` for ``count`` samples."""
    if not 0 <= shard < shards:
        raise InputError(f"shard {shard} is not in 0..{shards - 1}")
    return shard * count // shards, (shard + 1) * count // shards


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != len(SPLITS):
        raise InputError(f"need {len(SPLITS)} split fractions (train, val, test), got {list(fractions)}")
    values = tuple(float(f) for f in fractions)
    for name, value in zip(SPLITS, values, strict=True):
        if not 0.0 < value < 1.0:
            raise InputError(f"split fraction {name}={value} must be > 0 and < 1")
    if abs(sum(values) - 1.0) > 1e-6:
        raise InputError(f"split fractions train+val+test must sum to 1, got {' + '.join(map(str, values))}")
    return values  # type: ignore[return-value]


def split_counts(count: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Samples per split: round(count*train), round(count*val), and the rest for test."""
    train, val, _ = _check_fractions(fractions)
    n_train = round(count * train)
    n_val = round(count * val)
    counts = (n_train, n_val, count - n_train - n_val)
    for name, n in zip(SPLITS, counts, strict=True):
        if n < 1:
            raise InputError(
                f"split {name!r} would be empty ({count} samples, fractions {list(fractions)}); "
                "use more samples or a larger fraction"
            )
    return counts


def assign_splits(count: int, seed: int, fractions: Sequence[float]) -> np.ndarray:
    """The split (0 train, 1 val, 2 test) of every global index: int8 ``(count,)``."""
    n_train, n_val, _ = split_counts(count, fractions)
    order = np.random.default_rng([seed, _SPLIT_TAG]).permutation(count)
    assignment = np.full(count, 2, dtype=np.int8)
    assignment[order[:n_train]] = 0
    assignment[order[n_train : n_train + n_val]] = 1
    return assignment


def positions_in_split(assignment: np.ndarray) -> np.ndarray:
    """For each global index, its position (0-based) within its own split, in index order."""
    positions = np.empty(len(assignment), dtype=np.int64)
    for split in range(len(SPLITS)):
        members = assignment == split
        positions[members] = np.arange(int(members.sum()))
    return positions
