"""Shards and splits: how one dataset is cut into pieces that parallel jobs can make alone.

* **Shard ranges.** Shard ``s`` of ``n`` holds the contiguous global indices
  ``[s*count//n, (s+1)*count//n)``; every job computes its own range from the count.
* **Split assignment** is a pure function of ``(count, seed, fractions)``: a seeded permutation
  gives exactly ``round(count * fraction)`` samples to train and to val, the rest to test. No job
  has to read another job's output to know where a sample goes, and the assignment does not
  depend on the number of shards.
* **Record files** carry one shard's serialized Datums of one split: a small JSON header then
  length-framed (key, value) pairs. Keys are ``%08d`` of the sample's position within its split,
  ordered by global index, so concatenating the shards' files in shard order yields sorted keys
  for the single LMDB append writer.
* **Shard folders** hold the raw arrays (``images.npy``, ``labels.npy``) and ``meta.json``;
  ``np.save`` and sorted-key JSON write the same bytes for the same content (an ``.npz`` would
  not: zip entries carry the current time).

Everything is written to a temporary name and renamed, so a killed job leaves no half file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datumdb.errors import InputError

__all__ = [
    "RECORDS_FORMAT",
    "SHARD_FORMAT",
    "SPLITS",
    "assign_splits",
    "atomic_write",
    "check_shard_ids",
    "positions_in_split",
    "read_records",
    "read_shard",
    "read_shard_meta",
    "shard_range",
    "split_counts",
    "write_records",
    "write_shard",
]

SPLITS = ("train", "val", "test")
RECORDS_FORMAT = "datumdb-records/1"
SHARD_FORMAT = "datumdb-shard/1"
_MAGIC = b"DATUMREC"
_FRAME = struct.Struct("<IQ")  # key length, value length
_SPLIT_TAG = 0x5B117  # separates the split permutation from other streams seeded with `seed`


# ----------------------------------------------------------------------------- arithmetic


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


# ----------------------------------------------------------------------------- files


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _npy_bytes(array: np.ndarray) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_shard(folder: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write a shard folder: ``images.npy`` (n, C, H, W), ``labels.npy`` (n,) and ``meta.json``."""
    folder = Path(folder)
    if len(images) != len(labels):
        raise InputError(f"{folder}: {len(images)} images but {len(labels)} labels")
    atomic_write(folder / "images.npy", _npy_bytes(images))
    atomic_write(folder / "labels.npy", _npy_bytes(np.asarray(labels, dtype=np.int64)))
    atomic_write(folder / "meta.json", _json_bytes({"format": SHARD_FORMAT, **meta}))
    return folder


def read_shard_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A shard's ``meta.json``; a clear error if it is missing or not a shard."""
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: shard metadata not found (run generate-shard first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise InputError(f"{path}: not a {SHARD_FORMAT} file")
    return meta


def read_shard(folder: str | os.PathLike[str], *, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A shard's images (memory-mapped by default), labels and metadata, checked against each other."""
    folder = Path(folder)
    meta = read_shard_meta(folder)
    try:
        images = np.load(folder / "images.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: cannot read the shard arrays ({exc})") from None
    expected = int(meta["stop"]) - int(meta["start"])
    if len(images) != expected or len(labels) != expected or tuple(images.shape[1:]) != tuple(meta["shape"]):
        raise InputError(
            f"{folder}: arrays {images.shape} / {labels.shape} do not match meta.json "
            f"(range {meta['start']}..{meta['stop']}, shape {meta['shape']})"
        )
    return images, labels, meta


def write_records(path: str | os.PathLike[str], header: dict[str, Any], items: Iterable[tuple[bytes, bytes]]) -> Path:
    """Write a record file: magic, JSON header, then length-framed (key, value) pairs."""
    head = json.dumps({"format": RECORDS_FORMAT, **header}, sort_keys=True).encode("utf-8")
    parts = [_MAGIC, struct.pack("<I", len(head)), head]
    count = 0
    for key, value in items:
        parts += [_FRAME.pack(len(key), len(value)), key, value]
        count += 1
    parts.append(_FRAME.pack(0, count))  # trailer: an empty key and the record count
    return atomic_write(path, b"".join(parts))


def read_records(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Iterator[tuple[bytes, bytes]]]:
    """Open a record file: its header and an iterator of (key, value); truncation is an error."""
    path = Path(path)
    try:
        data = memoryview(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: record file not found (run serialize-shard first)") from None
    if bytes(data[: len(_MAGIC)]) != _MAGIC or len(data) < len(_MAGIC) + 4:
        raise InputError(f"{path}: not a datumdb record file")
    (head_len,) = struct.unpack_from("<I", data, len(_MAGIC))
    start = len(_MAGIC) + 4
    try:
        header = json.loads(bytes(data[start : start + head_len]))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: damaged header ({exc})") from None
    if header.get("format") != RECORDS_FORMAT:
        raise InputError(f"{path}: not a {RECORDS_FORMAT} file")
    return header, _iter_records(path, data, start + head_len)


def _iter_records(path: Path, data: memoryview, pos: int) -> Iterator[tuple[bytes, bytes]]:
    count = 0
    while True:
        if pos + _FRAME.size > len(data):
            raise InputError(f"{path}: truncated after {count} records")
        key_len, value_len = _FRAME.unpack_from(data, pos)
        pos += _FRAME.size
        if key_len == 0:
            if value_len != count or pos != len(data):
                raise InputError(f"{path}: damaged trailer (says {value_len} records, read {count})")
            return
        if pos + key_len + value_len > len(data):
            raise InputError(f"{path}: record {count} is truncated")
        yield bytes(data[pos : pos + key_len]), bytes(data[pos + key_len : pos + key_len + value_len])
        pos += key_len + value_len
        count += 1
