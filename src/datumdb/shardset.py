"""Shard sets: one split stored as content-defined shards, so a version costs what it changes.

DVC stores whole files, and one LMDB per split is one file: a 1% change to a 140 GB split is a
new 140 GB file in the remote. A shard set cuts the split into many small LMDBs (each a complete
Caffe-readable database with its manifest) whose membership is **content-defined**: a shard's
members depend only on the samples around it, never on how many samples come before it, so an
appended, removed or relabelled sample changes the shard it lives in and leaves the others'
bytes, and so their files in DVC's cache and remote, as they were.

* **Identity.** Every sample has an identity: the file path as listed for image files, the
  index for arrays (:func:`array_identities`). Its two 64-bit hashes, keyed by the seed
  (:func:`sample_hashes`), decide everything else.
* **Split** from the first hash alone: ``u = hash / 2**64`` falls in train's, val's or test's
  share of [0, 1). A sample's split depends on its identity and the seed only, so an append
  never moves an existing sample to another split; the fractions are the *expected* shares.
* **Shards.** Within a split, samples are taken in sequence order (the order given: an image
  list's lines, an array's rows), and a shard ends after a sample whose second hash is below a
  threshold (1 in ``mean - min`` samples), as content-defined chunking cuts a byte stream, with
  at least ``mean // 4`` and at most ``4 * mean`` samples. Samples appended to the sequence
  land in its last shards; an inserted, removed or relabelled sample changes the shard it falls
  in. A shard is named by its first member's hash, so an unchanged shard keeps its name and
  its bytes.
* **Order for Caffe.** Caffe's Data layer reads one LMDB front to back, so :func:`assemble`
  derives one database per split whose records follow the second hash (a seeded shuffle that
  needs no global permutation), keyed as datumdb keys today: ``%08d_<path>`` for image files,
  the zero-padded position otherwise.

On disk a shard set is a folder holding :data:`SHARD_INDEX` (the shards in order, with their
counts and content digests) and one database folder per shard. :class:`~datumdb.reader.DatumReader`
and :class:`~datumdb.torch_dataset.DatumDataset` open the folder as one sequence.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from datumdb.codec import ImreadMode
from datumdb.errors import (
    DatabaseChangedError,
    DatabaseNotFoundError,
    DatumDBError,
    DatumError,
    InputError,
    VerificationError,
)
from datumdb.keys import index_key
from datumdb.limits import (
    FILES_PER_OPEN_SHARD,
    MAX_MANIFEST_BYTES,
    available_memory,
    make_room_for_open_files,
    read_regular_file,
)
from datumdb.manifest import DATA_NAME, MANIFEST_NAME, SHARD_INDEX, read_manifest, single_or_mixed
from datumdb.pipeline.splits import SPLITS  # the split names (a pure module: no pipeline code runs)
from datumdb.reader import DatabaseVersion, DatumReader, batch_indices, register_folder_reader

__all__ = [
    "DEFAULT_MEAN_SHARD",
    "SHARD_INDEX",
    "Shard",
    "ShardPlan",
    "ShardSetReader",
    "array_identities",
    "assembled_key",
    "assembly_order",
    "cut_shards",
    "is_shard_set",
    "merged_summary",
    "plan_shards",
    "read_shard_index",
    "read_shard_index_bytes",
    "sample_hashes",
    "shard_key",
    "shard_name",
    "shard_set_digest",
    "split_of",
    "write_shard_index",
]

SHARD_INDEX_FORMAT = "datumdb-shards/1"
DEFAULT_MEAN_SHARD = 2048  # samples: ~400 MB of 256x256 raw photos, ~220 MB of ImageNet JPEGs
_PERSON = b"datumdb-shard/1"  # blake2b personalisation: these hashes are used for nothing else
_NAME = re.compile(r"^[0-9a-f]{16}$")


def array_identities(count: int) -> list[bytes]:
    """Identities of ``count`` array samples: the index, 8 bytes big-endian (sorts numerically)."""
    return [index.to_bytes(8, "big") for index in range(count)]


def sample_hashes(identities: Sequence[bytes], seed: int) -> np.ndarray:
    """``(n, 2)`` uint64: each identity's split hash and order hash, keyed by ``seed``."""
    key = int(seed).to_bytes(8, "little")
    out = np.empty((len(identities), 2), dtype=np.uint64)
    flat = out.reshape(-1)
    digests = b"".join(
        hashlib.blake2b(identity, digest_size=16, key=key, person=_PERSON).digest() for identity in identities
    )
    flat[:] = np.frombuffer(digests, dtype="<u8")
    return out


def split_of(split_hashes: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """The split (0 train, 1 val, 2 test) of each sample: its hash's place in [0, 1)."""
    train, val = float(fractions[0]), float(fractions[1])
    # Thresholds on the integer hash (no float rounding of 64-bit values).
    first = np.uint64(min(int(train * 2**64), 2**64 - 1))
    second = np.uint64(min(int((train + val) * 2**64), 2**64 - 1))
    return np.where(split_hashes < first, 0, np.where(split_hashes < second, 1, 2)).astype(np.int8)


def cut_shards(order_hashes: np.ndarray, mean: int) -> list[tuple[int, int]]:
    """Content-defined shard ranges ``[start, stop)`` of samples already in sequence order.

    A shard ends after a sample whose hash is below ``2**64 / (mean - min)``, once it holds at
    least ``min = max(1, mean // 4)`` samples, and at ``4 * mean`` whatever the hashes say:
    the expected size is then about ``mean``, and an edit moves at most the boundaries of the
    shard it falls in (and, rarely, of the next one when a forced cut shifts).
    """
    if mean < 1:
        raise InputError(f"the mean shard size must be >= 1, got {mean}")
    n = len(order_hashes)
    smallest, largest = max(1, mean // 4), 4 * mean
    threshold = np.uint64(min(2**64 // max(1, mean - smallest + 1), 2**64 - 1))
    ends = np.flatnonzero(order_hashes < threshold) + 1  # candidate stops
    ranges = []
    start = 0
    candidates = iter(ends.tolist())
    pending = next(candidates, None)
    while start < n:
        while pending is not None and pending - start < smallest:
            pending = next(candidates, None)
        stop = min(n, start + largest if pending is None else min(pending, start + largest))
        ranges.append((start, stop))
        start = stop
    return ranges


def shard_name(order_hash: int) -> str:
    """A shard's name: its first member's order hash, 16 hex digits (stable while it leads)."""
    return f"{int(order_hash):016x}"


def shard_key(position: int, tail: bytes = b"") -> bytes:
    """A record's key inside its shard: its position there, ``%08d``, then the identity's tail.

    For image files the tail is ``_<path>``, so every shard is keyed as Caffe's convert_imageset
    keys a database of just those files (in sequence order).
    """
    return b"%08d" % position + tail


def assembled_key(rank: int, count: int, tail: bytes) -> bytes:
    """A record's key in the assembled database: ``%08d_<path>`` for files, the padded rank otherwise."""
    return b"%08d" % rank + tail if tail else index_key(rank, count)


@dataclass(frozen=True)
class Shard:
    """One planned shard: its name and its members (indices into the sample list, in order)."""

    name: str
    members: np.ndarray

    def __len__(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class ShardPlan:
    """Which split and which shard every sample belongs to, and each sample's order hash."""

    shards: dict[str, list[Shard]]  # split name -> shards in sequence order
    order_hashes: np.ndarray  # uint64 per sample (the shuffle of the assembled database)

    def counts(self) -> dict[str, int]:
        return {split: sum(len(shard) for shard in shards) for split, shards in self.shards.items()}


def plan_shards(identities: Sequence[bytes], seed: int, fractions: Sequence[float], mean: int) -> ShardPlan:
    """Split ``identities`` (in sequence order) by hash and cut each split into content-defined shards.

    Duplicate identities are refused: a sample must be one thing (the pipeline numbers a path
    listed again, :mod:`datumdb.pipeline.plan`).
    """
    if len(set(identities)) != len(identities):
        seen: set[bytes] = set()
        duplicate = next(i for i in identities if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise InputError(f"sample {duplicate.decode('utf-8', 'backslashreplace')!r} is listed twice")
    hashes = sample_hashes(identities, seed)
    splits = split_of(hashes[:, 0], fractions)
    by_identity = np.arange(len(identities), dtype=np.int64)  # the sequence order, as given
    shards: dict[str, list[Shard]] = {}
    for number, split in enumerate(SPLITS):
        members = by_identity[splits[by_identity] == number]
        order_hashes = hashes[members, 1]
        shards[split] = [
            Shard(shard_name(order_hashes[start]), members[start:stop])
            for start, stop in cut_shards(order_hashes, mean)
        ]
    return ShardPlan(shards, hashes[:, 1].copy())


# ---------------------------------------------------------------------- the shard set on disk


def is_shard_set(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a shard-set folder (it holds :data:`SHARD_INDEX`)."""
    return (Path(path) / SHARD_INDEX).is_file()


def write_shard_index(
    folder: str | os.PathLike[str],
    split: str,
    seed: int,
    names: Sequence[str],
    *,
    pipeline: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the index of the shard set ``folder`` from its shards' manifests; the index.

    Fixed key order, no timestamps: the same shards give the same bytes. Written under a
    temporary name and renamed, so a reader never sees half an index. ``pipeline``: what the
    pipeline records of the set (its plan's fingerprint).
    """
    folder = Path(folder)
    shards = []
    for name in names:
        manifest = read_manifest(folder / name)
        shards.append({"name": name, "count": manifest["count"], "digest": manifest["digest"]})
    index = {
        "format": SHARD_INDEX_FORMAT,
        "split": split,
        "seed": seed,
        "count": sum(shard["count"] for shard in shards),
        "shards": shards,
        **({"pipeline": dict(pipeline)} if pipeline is not None else {}),
    }
    temporary = folder / f".{SHARD_INDEX}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, folder / SHARD_INDEX)
    return index


def read_shard_index_bytes(folder: str | os.PathLike[str]) -> bytes:
    """The bytes of the index of the shard set ``folder`` (a regular file of bounded size)."""
    path = Path(folder) / SHARD_INDEX
    if not path.exists():
        raise DatabaseNotFoundError(f"{folder}: not a shard set (no {SHARD_INDEX})")
    return read_regular_file(path, "shard index", MAX_MANIFEST_BYTES)


def read_shard_index(folder: str | os.PathLike[str], data: bytes | None = None) -> dict[str, Any]:
    """The index of the shard set ``folder``, checked: every shard named exists, counts add up.

    ``data``: the index's bytes, if already read (so that what is checked is what the caller
    pins). A damaged or hand-edited index is a :class:`~datumdb.errors.VerificationError`
    naming the file and the field, never a traceback or a shard read from outside the folder.
    """
    folder = Path(folder)
    path = folder / SHARD_INDEX
    try:
        index = json.loads(read_shard_index_bytes(folder) if data is None else data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != SHARD_INDEX_FORMAT:
        raise VerificationError(f"{path}: not a datumdb shard index (format {SHARD_INDEX_FORMAT})")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise VerificationError(f"{path}: 'shards' must be a list")
    total = 0
    for number, shard in enumerate(shards):
        if (
            not isinstance(shard, dict)
            or not isinstance(shard.get("name"), str)
            or not _NAME.match(shard["name"])
            or not isinstance(shard.get("count"), int)
            or isinstance(shard.get("count"), bool)
            or shard["count"] < 0
        ):
            raise VerificationError(f"{path}: shards[{number}] must have a 16-hex-digit 'name' and a 'count'")
        if not (folder / shard["name"] / DATA_NAME).is_file():
            raise DatabaseNotFoundError(f"{path}: shard {shard['name']} is missing ({folder / shard['name']})")
        total += shard["count"]
    if index.get("count") != total:
        raise VerificationError(f"{path}: 'count' is {index.get('count')!r}, the shards hold {total}")
    return index


def shard_folders(folder: str | os.PathLike[str]) -> list[Path]:
    """The shard databases of ``folder``, in the index's order."""
    return [Path(folder) / shard["name"] for shard in read_shard_index(folder)["shards"]]


def stray_shards(folder: str | os.PathLike[str], keep: Iterable[str]) -> list[Path]:
    """Shard folders under ``folder`` (named like shards) that ``keep`` does not list."""
    keep = set(keep)
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name) and p.name not in keep and p.is_dir())


# ---------------------------------------------------------------------- assembly


def assembly_order(orders: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """(shard, position) of every record in the assembled order: by order hash, then place.

    ``orders[s]`` lists shard ``s``'s records' order hashes (hex) as its manifest records them.
    """
    entries = [
        (int(value, 16), shard, position)
        for shard, hashes in enumerate(orders)
        for position, value in enumerate(hashes)
    ]
    entries.sort()
    return [(shard, position) for _, shard, position in entries]


def merged_statistics(manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The per-record statistics of several databases' manifests, added up (for an assembly)."""
    labels: Counter[int] = Counter()
    shapes: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    encodings: Counter[str] = Counter()
    payload = 0
    for manifest in manifests:
        for label, count in manifest["label_histogram"].items():
            labels[int(label)] += count
        for shape, count in manifest["shapes"].items():
            shapes[shape] += count
        if manifest["count"]:
            dtypes[manifest["dtype"]] += manifest["count"]
            encodings[manifest["encoding"]] += manifest["count"]
        payload += manifest["payload_bytes"]
    return {"labels": labels, "shapes": shapes, "dtypes": dtypes, "encodings": encodings, "payload_bytes": payload}


def merged_summary(manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What one manifest says of several databases' records together: their shapes, dtype,
    encoding, label histogram and payload bytes, as a shard set's reader and verify report them."""
    stats = merged_statistics(manifests)
    return {
        "shapes": dict(sorted(stats["shapes"].items())),
        "dtype": single_or_mixed(stats["dtypes"]),
        "encoding": single_or_mixed(stats["encodings"]),
        "label_histogram": {str(label): stats["labels"][label] for label in sorted(stats["labels"])},
        "payload_bytes": stats["payload_bytes"],
    }


def write_shard(
    path: str | os.PathLike[str],
    records: Iterable[tuple[bytes, bytes, tuple[int, int, int] | None, int]],
    *,
    metadata: Mapping[str, Any],
    **writer_options: Any,
) -> dict[str, Any]:
    """Write one shard database at ``path`` from ``(tail, value, shape, order_hash)`` records.

    The records come in sequence order; each is keyed :func:`shard_key` of its position and its
    tail, and its order hash is kept in the manifest (``metadata.order``), which is all
    :func:`assemble` needs to place it without reading any other shard. Published atomically,
    replacing a previous version of the same shard.
    """
    from datumdb.writer import DatabaseWriter

    order: list[str] = []
    shapes: Counter[str] = Counter()
    with DatabaseWriter(
        path, overwrite=True, only_replace_own=True, metadata=dict(metadata), **writer_options
    ) as writer:
        for position, (tail, value, shape, order_hash) in enumerate(records):
            writer.add_serialized(value, shard_key(position, tail), shape=shape)
            order.append(f"{int(order_hash):016x}")
            if shape is not None:
                shapes["x".join(map(str, shape))] += 1
        writer.metadata["order"] = order
        # every shape, where the manifest names only the most common: a set's whole histogram
        writer.metadata["all_shapes"] = dict(sorted(shapes.items()))
    return read_manifest(Path(path))


def _map_size_for(folders: Sequence[Path]) -> int:
    """An initial map for an assembly: the shards' files together, plus an eighth, in MiB."""
    total = sum((folder / DATA_NAME).stat().st_size for folder in folders)
    return max(1 << 20, (total + total // 8 + (1 << 20)) >> 20 << 20)


def _prefetch_if_it_fits(readers: Sequence[DatumReader], folders: Sequence[Path]) -> None:
    """Have the kernel read every shard ahead of the assembly's shuffled reads, if they fit in
    half the memory free for it (:meth:`~datumdb.reader.DatumReader.prefetch`): shards left
    unread for a while come back from disk in large reads instead of a 4 KiB fault per page. A
    split larger than that (ImageNet's 140 GB) is read as it is assembled, as before: fetching
    it all would push its own first shards out of the cache before they are read."""
    room = available_memory()
    if room is not None and sum((folder / DATA_NAME).stat().st_size for folder in folders) <= room // 2:
        for reader in readers:
            reader.prefetch()


def _open_shards(readers: Sequence[DatumReader], shard_set: str | os.PathLike[str]) -> None:
    """Open (pin) every shard's reader before any is read: LMDB's maps are then located from one
    listing of the process's mappings for all of them. Room is made for their descriptors first,
    or one clear error names the set (:func:`~datumdb.limits.make_room_for_open_files`)."""
    make_room_for_open_files(FILES_PER_OPEN_SHARD * len(readers), f"{shard_set} ({len(readers)} shards)")
    for reader in readers:
        reader.pin()


def assemble(
    shard_set: str | os.PathLike[str],
    db: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    **writer_options: Any,
) -> dict[str, Any]:
    """One database of every record of ``shard_set``, in the seeded shuffled order; its manifest.

    Values are copied as they are stored (never decoded or re-encoded): the assembled database
    holds exactly the shards' bytes under new keys (:func:`assembled_key` of the record's rank
    in :func:`assembly_order`). The per-record statistics of its manifest are the shards' own,
    added up; its content digest is computed afresh while writing, so ``datumdb verify``
    checks it like any other database.
    """
    from datumdb.writer import DatabaseWriter

    index = read_shard_index(shard_set)
    folders = [Path(shard_set) / shard["name"] for shard in index["shards"]]
    manifests = [read_manifest(folder) for folder in folders]
    orders = []
    for folder, manifest, shard in zip(folders, manifests, index["shards"], strict=True):
        order = (manifest.get("metadata") or {}).get("order")
        if not isinstance(order, list) or len(order) != manifest["count"] or manifest["count"] != shard["count"]:
            raise VerificationError(
                f"{folder}/{MANIFEST_NAME}: its order hashes do not match its {shard['count']} records"
            )
        orders.append(order)
    placement = assembly_order(orders)
    total = len(placement)
    first = manifests[0] if manifests else {}
    readers = [DatumReader(folder) for folder in folders]
    try:
        _open_shards(readers, shard_set)
        _prefetch_if_it_fits(readers, folders)
        keys = [reader.keys() for reader in readers]
        options = {"encoding": first.get("encoding") if first.get("encoding") in ("png", "jpg") else "none"}
        # The assembled database is derived locally and checked through its content digest: the
        # whole-file sha256 (a second pass over every byte) is left out of its manifest.
        options |= {"channel_order": first.get("channel_order", "BGR"), "hash_file": False}
        # A map that holds every shard's file from the start: growing it replays a whole batch.
        options["map_size"] = _map_size_for(folders)
        options |= writer_options
        carried: dict[str, Any] = {"assembled_from": index["split"]}
        shard_metadata = [manifest.get("metadata") or {} for manifest in manifests]
        if any("skipped" in m for m in shard_metadata):  # the images left out, as one database records them
            carried["skipped"] = [sample for m in shard_metadata for sample in m.get("skipped") or []]
        if shard_metadata and "classes" in shard_metadata[0]:
            carried["classes"] = shard_metadata[0]["classes"]
        with DatabaseWriter(db, overwrite=overwrite, metadata={**(metadata or {}), **carried}, **options) as writer:
            # A batch at a time: views of the shards' maps (LMDB copies them into its pages)
            step = writer.batch_size
            for start in range(0, total, step):
                records = []
                for rank, (shard, position) in enumerate(placement[start : start + step], start):
                    key = keys[shard][position]
                    records.append((assembled_key(rank, total, key[8:]), readers[shard].value_view(key)))
                writer.add_copied_many(records)
            writer.merge_statistics(merged_statistics(manifests))
    finally:
        for reader in readers:
            reader.close()
    return read_manifest(Path(db))


# ---------------------------------------------------------------------- reading a shard set


class ShardSetReader(DatumReader):
    """A shard set read as one sequence: what ``DatumReader(folder)`` gives for a shard-set folder.

    Record ``i`` is record ``i - start[s]`` of shard ``s``, the shards in the index's order,
    so one index spans every shard and ``DistributedSampler``, ``read_batch`` and
    :class:`~datumdb.torch_dataset.DatumDataset` work as on one database. Each shard is read by
    its own :class:`DatumReader` (pinned, lock-free, fork- and spawn-safe as always); the index
    file is pinned too: a reader pickled into another process raises
    :class:`~datumdb.errors.DatabaseChangedError` there if the set was rebuilt meanwhile.
    Keys are ``<shard name>/<key in the shard>``, unique across the set.
    """

    def __init__(self, path: str | os.PathLike[str], *, imread: ImreadMode | Literal["auto"] = "auto") -> None:
        if imread not in ("auto", "unchanged", "color", "gray"):
            raise ValueError(f"imread must be 'auto', 'unchanged', 'color' or 'gray', got {imread!r}")
        self.path = Path(path)
        self.imread = imread
        self._index_text = read_shard_index_bytes(self.path)  # read once: what is checked is what is pinned
        index = read_shard_index(self.path, self._index_text)
        self._setup(index, [DatumReader(self.path / shard["name"], imread=imread) for shard in index["shards"]])

    def _setup(self, index: dict[str, Any], parts: list[DatumReader]) -> None:
        """What the reader derives from its pinned index and its shards' readers."""
        self._index = index
        self._names = [shard["name"] for shard in index["shards"]]
        self._parts = parts
        counts = np.array([shard["count"] for shard in index["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._fast = None
        self._merged: dict[str, Any] | None = None
        self._opened_in: int | None = None

    def _open_parts(self) -> None:
        """Open every shard at the first read in this process, before any is read: LMDB's maps
        are then located from one listing of the process's mappings for all of them."""
        if self._opened_in != os.getpid():
            _open_shards(self._parts, self.path)
            self._opened_in = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "imread": self.imread, "index": self._index_text, "parts": self._parts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.imread = state["imread"]
        self._index_text = state["index"]
        self._setup(json.loads(self._index_text), state["parts"])

    def _check_index(self) -> None:
        try:
            current = read_shard_index_bytes(self.path)
        except (OSError, DatumDBError):  # gone, or no longer a regular file: not the pinned index
            current = None
        if current != self._index_text:
            raise DatabaseChangedError(f"{self.path}: the shard set was rebuilt since this reader was pinned")

    def pin(self) -> ShardSetReader:
        self._check_index()
        for part, count in zip(self._parts, np.diff(self._starts).tolist(), strict=True):
            part.pin()
            if len(part) != count:
                raise VerificationError(f"{part.path}: holds {len(part)} records, {SHARD_INDEX} says {count}")
        return self

    @property
    def version(self) -> tuple[DatabaseVersion, ...]:  # type: ignore[override]
        """The pinned version of every shard, in order."""
        return tuple(part.version for part in self._parts)

    def close(self) -> None:
        for part in self._parts:
            part.close()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: Any) -> tuple[int, int]:
        self._open_parts()
        position = self._position(index)
        count = len(self)
        if not -count <= position < count:
            raise IndexError(f"{self.path}: index {position} out of range for {count} records")
        position %= count
        shard = int(np.searchsorted(self._starts, position, side="right")) - 1
        return shard, position - int(self._starts[shard])

    def keys(self) -> tuple[bytes, ...]:
        self._open_parts()
        return tuple(
            name.encode() + b"/" + key
            for name, part in zip(self._names, self._parts, strict=True)
            for key in part.keys()  # noqa: SIM118 (a reader iterates over records, not keys)
        )

    def key(self, index: int) -> bytes:
        shard, local = self._locate(index)
        return self._names[shard].encode() + b"/" + self._parts[shard].key(local)

    def _part_for(self, key: bytes | str) -> tuple[DatumReader, bytes]:
        self._open_parts()
        raw = key.encode("utf-8") if isinstance(key, str) else key
        name, _, local = raw.partition(b"/")
        try:
            return self._parts[self._names.index(name.decode("ascii"))], local
        except (ValueError, UnicodeDecodeError):
            raise KeyError(f"{self.path}: no record with key {raw.decode('utf-8', 'backslashreplace')!r}") from None

    def __getitem__(self, index: int | slice) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        shard, local = self._locate(index)
        return self._parts[shard][local]

    def datum(self, key_or_index: bytes | str | int) -> Any:
        if isinstance(key_or_index, (bytes, str)):
            part, local = self._part_for(key_or_index)
            return part.datum(local)
        shard, local = self._locate(key_or_index)
        return self._parts[shard].datum(local)

    def value(self, key: bytes | str) -> bytes:
        part, local = self._part_for(key)
        return part.value(local)

    def value_view(self, key: bytes | str) -> memoryview:
        part, local = self._part_for(key)
        return part.value_view(local)

    def prefetch(self) -> None:
        self._open_parts()
        for part in self._parts:
            part.prefetch()

    def get(self, key: bytes | str) -> tuple[np.ndarray, int]:
        part, local = self._part_for(key)
        return part.get(local)

    def __iter__(self) -> Any:
        self._open_parts()
        for part in self._parts:
            yield from part

    def datums(self) -> Any:
        self._open_parts()
        for name, part in zip(self._names, self._parts, strict=True):
            for key, datum in part.datums():
                yield name.encode() + b"/" + key, datum

    def items(self) -> Any:
        self._open_parts()
        for name, part in zip(self._names, self._parts, strict=True):
            for key, value in part.items():
                yield name.encode() + b"/" + key, value

    def build_index(self) -> bool:
        return all([part.build_index() for part in self._parts])

    def assembly_positions(self) -> np.ndarray:
        """The set's record indices in the order :func:`assemble` writes them (the seeded
        shuffle): what reads the set as Caffe would read its assembled database (the mean)."""
        orders = []
        for part in self._parts:
            order = (part._manifest_view().get("metadata") or {}).get("order")
            if not isinstance(order, list) or len(order) != len(part):
                raise VerificationError(f"{part.path}/{MANIFEST_NAME}: its order hashes do not match its records")
            orders.append(order)
        placement = assembly_order(orders)
        return np.array([int(self._starts[shard]) + position for shard, position in placement], dtype=np.int64)

    def read_batch(
        self, indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One batch across shards: each shard's records gathered by its own reader, then placed."""
        count = len(self)
        positions = batch_indices(self.path, indices, out, count) % max(count, 1)
        shards = np.searchsorted(self._starts, positions, side="right") - 1
        labels = np.empty(len(positions), dtype=np.int64)
        for shard in np.unique(shards).tolist():
            rows = np.flatnonzero(shards == shard)
            images, part_labels = self._parts[shard].read_batch(positions[rows] - self._starts[shard])
            if out is None:
                out = np.empty((len(positions), *images.shape[1:]), dtype=images.dtype)
            if images.shape[1:] != out.shape[1:] or images.dtype != out.dtype:
                raise DatumError(
                    f"{self._parts[shard].path}: records are {images.dtype} {images.shape[1:]}, "
                    f"the batch is {out.dtype} {out.shape[1:]}"
                )
            out[rows] = images
            labels[rows] = part_labels
        if out is None:
            raise ValueError("read_batch needs at least one index (or a preallocated out array)")
        return out, labels

    @property
    def decode_mode(self) -> ImreadMode:
        return self._parts[0].decode_mode if self._parts else "unchanged"

    @property
    def manifest(self) -> dict[str, Any]:
        """One manifest for the set: the shards' statistics added up, and the index."""
        if self._merged is None:
            manifests = [part._manifest_view() for part in self._parts]
            summary = merged_summary(manifests)
            self._merged = {
                "format": SHARD_INDEX_FORMAT,
                "count": len(self),
                "shapes": summary["shapes"],
                "dtype": summary["dtype"],
                "encoding": summary["encoding"],
                "channel_order": manifests[0]["channel_order"] if manifests else "BGR",
                "label_histogram": summary["label_histogram"],
                "payload_bytes": summary["payload_bytes"],
                "shards": self._index["shards"],
                "metadata": manifests[0].get("metadata", {}) if manifests else {},
            }
        return copy.deepcopy(self._merged)

    def __repr__(self) -> str:
        return f"DatumReader({str(self.path)!r})  # a shard set of {len(self._parts)} shards"


register_folder_reader(SHARD_INDEX, ShardSetReader)  # DatumReader(folder) opens a shard set as one


def shard_set_digest(index: Mapping[str, Any]) -> str:
    """A shard set's content digest, from its index: its shards' content digests in order."""
    joined = "".join(str(shard.get("digest")) for shard in index["shards"])
    return "shards:" + hashlib.sha256(joined.encode()).hexdigest()
