"""The content digest and the ``datumdb.json`` manifest that sits beside ``data.mdb``.

``data.mdb`` bytes depend on LMDB's page size, version and commit history, so they cannot be
compared across platforms. The content digest can: it is sha256 over the (key, value) pairs in
key order, each framed by its lengths so that no two different databases hash alike (hashed in
chunks of 1024 records, see :class:`ContentDigest`). It is computed while writing (keys arrive
in order) and recomputed by ``datumdb verify``.

The manifest is plain JSON with a fixed key order and no timestamps, so the same build writes
the same bytes and DVC sees no change.

Reading one is reading untrusted input: ``datumdb.json`` must be a regular file (a FIFO or a
device in its place would hang or flood ``inspect``) of at most :data:`~datumdb.limits.MAX_MANIFEST_BYTES`
(64 MiB; a million-record manifest is under 1 MiB), nested at most :data:`MAX_MANIFEST_DEPTH`
levels, and its known fields must have their types; anything else is a
:class:`~datumdb.errors.VerificationError` naming the file and field, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datumdb.errors import DatabaseNotFoundError, UnsafeInputError, VerificationError
from datumdb.limits import MAX_MANIFEST_BYTES, read_regular_file

if TYPE_CHECKING:
    import numpy as np

    Buffer = bytes | bytearray | memoryview | np.ndarray  # one-dimensional bytes, viewed without a copy

__all__ = [
    "DATA_NAME",
    "MANIFEST_NAME",
    "RECORD_FRAME",
    "SHARD_INDEX",
    "ContentDigest",
    "decode_mode",
    "describe_labels",
    "describe_shapes",
    "digest_items",
    "file_sha256",
    "listed_shapes",
    "read_manifest",
    "shape_summary",
    "single_or_mixed",
    "write_manifest",
]

DATA_NAME = "data.mdb"  # LMDB's data file: the only file Caffe opens
MANIFEST_NAME = "datumdb.json"  # ours, beside it: never inside the database, which Caffe parses
SHARD_INDEX = "shards.json"  # a shard set's index, beside its shard folders (datumdb.shardset)
MANIFEST_FORMAT = "datumdb-manifest/1"
_DIGEST_DOMAIN = b"datumdb content digest v1\n"
# What precedes each (key, value) in the digested stream: key length (LMDB keys are < 512
# bytes), value length. Public because the writer and verify lay records out this way in bulk.
RECORD_FRAME = struct.Struct("<IQ")
RECORDS_PER_CHUNK = 1024
MAX_MANIFEST_DEPTH = 32
SHAPES_LISTED = 20
"""A manifest or report lists at most this many shapes (the most common) by name; more distinct
sizes (a photo folder at its own sizes: ~100,000 for ImageNet) are described by
:func:`shape_summary` instead, whose ``sha256`` still pins the full histogram for ``verify``."""
SIZE_BINS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Upper edges of the longer-side bins of :func:`shape_summary`'s histogram (the last bin is open)."""


class ContentDigest:
    """Incremental content digest: feed (key, value) pairs in key order, read ``hexdigest``.

    Two levels, so that damage can be located without hashing anything twice: each run of
    :data:`RECORDS_PER_CHUNK` records gets a sha256 over its length-framed pairs; the content
    digest is sha256 over a domain tag, those chunk digests in order, and the record count.
    The chunk digests go into the manifest, and verify names the records of the first chunk
    that differs.
    """

    __slots__ = ("_chunk", "_chunk_count", "_outer", "chunk_first_keys", "chunks", "count")

    def __init__(self) -> None:
        self._outer = hashlib.sha256(_DIGEST_DOMAIN)
        self._chunk = hashlib.sha256()
        self._chunk_count = 0
        self.chunks: list[str] = []
        self.chunk_first_keys: list[bytes] = []
        self.count = 0

    def update(self, key: bytes | memoryview, value: bytes | memoryview) -> None:
        if self._chunk_count == 0:
            self.chunk_first_keys.append(bytes(key))
        self._chunk.update(RECORD_FRAME.pack(len(key), len(value)) + bytes(key))
        self._chunk.update(value)
        self._chunk_count += 1
        self.count += 1
        if self._chunk_count == RECORDS_PER_CHUNK:
            self._end_chunk()

    def update_framed(self, framed: Buffer, bounds: Sequence[int] | np.ndarray) -> None:
        """Feed records already laid out as they are hashed: the same digest as :meth:`update`.

        Record ``i`` is ``framed[bounds[i]:bounds[i + 1]]``: :data:`RECORD_FRAME`, key, value,
        records back to back. Each run of records within one chunk is hashed in one call, which
        releases the GIL (hashlib does for buffers over 2 KiB) and costs no Python per record:
        this is what lets the writer and verify hash in a worker thread while they go on.
        """
        view = memoryview(framed)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        total = len(bounds) - 1
        done = 0
        while done < total:
            start = int(bounds[done])
            if self._chunk_count == 0:
                key_length = RECORD_FRAME.unpack_from(view, start)[0]
                first_key = start + RECORD_FRAME.size
                self.chunk_first_keys.append(bytes(view[first_key : first_key + key_length]))
            take = min(RECORDS_PER_CHUNK - self._chunk_count, total - done)
            self._chunk.update(view[start : int(bounds[done + take])])
            self._chunk_count += take
            self.count += take
            done += take
            if self._chunk_count == RECORDS_PER_CHUNK:
                self._end_chunk()

    def _end_chunk(self) -> None:
        digest = self._chunk.digest()
        self.chunks.append(digest.hex())
        self._outer.update(digest)
        self._chunk = hashlib.sha256()
        self._chunk_count = 0

    @property
    def chunk_digests(self) -> list[str]:
        """Hex sha256 of each chunk of records, the last (partial) one included."""
        return self.chunks + ([self._chunk.hexdigest()] if self._chunk_count else [])

    @property
    def hexdigest(self) -> str:
        """``sha256:<64 hex digits>``; the prefix leaves room for other algorithms later."""
        outer = self._outer.copy()
        if self._chunk_count:
            outer.update(self._chunk.digest())
        outer.update(struct.pack("<Q", self.count))
        return "sha256:" + outer.hexdigest()


def decode_mode(manifest: dict[str, Any] | None) -> str:
    """How to decode a database's encoded images so that they match its manifest.

    The manifest's shapes describe the images as they were loaded (BGR, or gray), but Caffe's
    convert_imageset stores the original file bytes when nothing changes, which may be RGBA,
    16-bit or colour even in a ``--gray`` build. Decoding with the manifest's channel order
    (OpenCV IMREAD_COLOR / IMREAD_GRAYSCALE, as a Caffe data layer's force_color / force_gray
    would) gives back exactly those shapes; without a manifest, "unchanged" (Caffe's default).
    """
    order = (manifest or {}).get("channel_order")
    return {"gray": "gray", "BGR": "color"}.get(order, "unchanged")


def listed_shapes(shapes: dict[str, int]) -> dict[str, int]:
    """The shapes a manifest or report names: all of them, or the :data:`SHAPES_LISTED` most
    common (ties by name), in name order."""
    if len(shapes) <= SHAPES_LISTED:
        return dict(sorted(shapes.items()))
    common = sorted(shapes.items(), key=lambda item: (-item[1], item[0]))[:SHAPES_LISTED]
    return dict(sorted(common))


def shapes_sha256(shapes: dict[str, int]) -> str:
    """sha256 of a whole shape histogram (name order): what verify compares when a manifest
    lists only the most common shapes."""
    body = json.dumps(dict(sorted(shapes.items())), separators=(",", ":"))
    return "sha256:" + hashlib.sha256(body.encode("utf-8")).hexdigest()


def shape_summary(shapes: dict[str, int]) -> dict[str, Any] | None:
    """A readable account of a histogram of shapes (``"CxHxW": count``), or None for one shape.

    At 10^5 images of their own sizes, a list of every size says nothing to a reader: this
    says how many distinct sizes there are, the min / median / max height and width over the
    images (the median is the lower one: a size that occurs), the channel counts, a histogram of
    the longer side in :data:`SIZE_BINS`, and the most common sizes; ``sha256`` pins the full
    histogram (:func:`shapes_sha256`). Shapes of fewer than two dimensions, or ``"unknown"``,
    count in ``unknown`` only.
    """
    if len(shapes) <= 1:
        return None
    sizes: list[tuple[int, int, int, int]] = []  # (height, width, channels, count)
    unknown = 0
    for name, count in shapes.items():
        try:
            dims = [int(d) for d in name.split("x")]
        except ValueError:
            dims = []
        if len(dims) < 2:
            unknown += count
            continue
        channels = dims[0] if len(dims) > 2 else 1
        sizes.append((dims[-2], dims[-1], channels, count))
    bins: dict[str, int] = {}
    lower = 1
    for upper in (*SIZE_BINS, None):
        inside = sum(c for h, w, _, c in sizes if lower <= max(h, w) and (upper is None or max(h, w) <= upper))
        if inside:
            bins[f"{lower}-{upper}" if upper is not None else f"{lower}+"] = inside
        lower = (upper or 0) + 1
    channels: dict[str, int] = {}
    for _, _, c, count in sizes:
        channels[str(c)] = channels.get(str(c), 0) + count
    common = sorted(shapes.items(), key=lambda item: (-item[1], item[0]))[:10]
    summary: dict[str, Any] = {
        "distinct": len(shapes),
        "images": sum(shapes.values()),
        "height": _spread([(h, c) for h, _, _, c in sizes]),
        "width": _spread([(w, c) for _, w, _, c in sizes]),
        "channels": dict(sorted(channels.items(), key=lambda item: int(item[0]))),
        "longer_side": bins,
        "most_common": [[name, count] for name, count in common],
        "sha256": shapes_sha256(shapes),
    }
    if unknown:
        summary["unknown"] = unknown
    return summary


def _spread(values: list[tuple[int, int]]) -> dict[str, int] | None:
    """min / (lower) median / max of values given with their counts."""
    if not values:
        return None
    ordered = sorted(values)
    middle = (sum(c for _, c in ordered) - 1) // 2
    seen = 0
    median = ordered[-1][0]
    for value, count in ordered:
        seen += count
        if seen > middle:
            median = value
            break
    return {"min": ordered[0][0], "median": median, "max": ordered[-1][0]}


def describe_shapes(shapes: dict[str, int], summary: dict[str, Any] | None) -> str:
    """One line for people (``inspect``): the shape, or the summary of many."""
    if summary is None:
        return ", ".join(f"{name} ({count})" for name, count in shapes.items()) or "none"
    parts = [f"{summary['distinct']} distinct sizes over {summary['images']} images"]
    for side in ("height", "width"):
        if summary.get(side):
            spread = summary[side]
            parts.append(f"{side} {spread['min']}/{spread['median']}/{spread['max']} (min/median/max)")
    parts.append("longer side " + ", ".join(f"{b}: {n}" for b, n in summary["longer_side"].items()))
    parts.append("most common " + ", ".join(f"{name} ({count})" for name, count in summary["most_common"][:5]))
    return "; ".join(parts)


def describe_labels(histogram: dict[str, int], classes: Sequence[str] | None, most: int = 10) -> str:
    """One line for people (``inspect``): label counts, with class names where the manifest has them."""

    def name(label: str) -> str:
        index = int(label)
        return f"{label} {classes[index]}" if classes is not None and 0 <= index < len(classes) else label

    if len(histogram) <= most:
        return ", ".join(f"{name(label)}: {count}" for label, count in histogram.items()) or "none"
    counts = sorted(histogram.items(), key=lambda item: (-item[1], int(item[0])))
    fewest = counts[-1]
    return (
        f"{len(histogram)} labels, {sum(histogram.values())} records; most: {name(counts[0][0])}: {counts[0][1]}; "
        f"fewest: {name(fewest[0])}: {fewest[1]}"
    )


def digest_items(items: Iterable[tuple[bytes | memoryview, bytes | memoryview]]) -> str:
    """Content digest of (key, value) pairs that are already in key order."""
    digest = ContentDigest()
    for key, value in items:
        digest.update(key, value)
    return digest.hexdigest


def _render(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


def _checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return "sha256:" + hashlib.sha256(_render(body).encode("utf-8")).hexdigest()


_HASH_WINDOW = 64 << 20
"""Bytes of a file mapped at a time while hashing it: the process's resident set grows by one
window, not by the file (a mapped page counts in RSS until it is unmapped, and schedulers such
as SLURM may judge a job by its RSS)."""


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hashlib releases the GIL, so this can run in a thread).

    Hashed through read-only maps of :data:`_HASH_WINDOW` bytes, not copied out in chunks: an
    eighth less time for a database of photos, whose hash ends its build. The writer hashes only
    the file it has just written, in its own work folder. A file that cannot be mapped (a file
    system without maps) is read in ``chunk_size`` pieces instead."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            for offset in range(0, size, _HASH_WINDOW):
                length = min(_HASH_WINDOW, size - offset)
                with mmap.mmap(handle.fileno(), length, offset=offset, access=mmap.ACCESS_READ) as mapped:
                    digest.update(mapped)
        except (OSError, ValueError):
            digest = hashlib.sha256()
            handle.seek(0)
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any], *, durable: bool = True) -> Path:
    """Write ``datumdb.json`` durably (fsync, unless the caller syncs later) with a stable
    layout: same content, same bytes.

    A ``checksum`` of the other fields is added last, so that :func:`read_manifest` notices any
    change to any byte of the file, not only to the fields verification recomputes.
    """
    path = Path(folder) / MANIFEST_NAME
    manifest = {k: v for k, v in manifest.items() if k != "checksum"}
    manifest["checksum"] = _checksum(manifest)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(_render(manifest))
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
    return path


def single_or_mixed(counter: Mapping[str, int]) -> str | None:
    """A manifest's ``dtype`` or ``encoding``: the one value every record has, or "mixed" (None: no record)."""
    if not counter:
        return None
    return next(iter(counter)) if len(counter) == 1 else "mixed"


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load a database's manifest; a clear error if it is missing, unsafe, malformed or damaged."""
    path = Path(folder) / MANIFEST_NAME
    try:
        raw = read_regular_file(path, "manifest", MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise DatabaseNotFoundError(f"{path}: no manifest (was this database written by datumdb?)") from None
    except UnsafeInputError as exc:
        raise VerificationError(str(exc)) from None
    except OSError as exc:
        raise VerificationError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
        manifest = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an int of > 4300 digits, deep nesting
        raise VerificationError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise VerificationError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    _check_depth(path, manifest)
    _check_fields(path, manifest)
    if not _checksum_matches(text, manifest.get("checksum")):
        raise VerificationError(f"{path}: manifest was modified or damaged (its checksum or layout does not match)")
    return manifest


def _checksum_matches(text: str, checksum: object) -> bool:
    """Whether ``text`` is a manifest as :func:`write_manifest` writes it, with that checksum.

    The checksum is the sha256 of the manifest rendered without it (:func:`_render`), which is
    the file's own text with its last entry (the checksum) taken out: so that text is hashed as
    it is, and any change to any byte of the file (a value, the layout) fails, without
    rendering the manifest again (at thousands of shards, rendering was most of opening one).
    """
    if not isinstance(checksum, str):
        return False
    suffix = f',\n  "checksum": {json.dumps(checksum)}\n}}\n'
    if not text.endswith(suffix):
        return False
    body = text[: -len(suffix)] + "\n}\n"
    return checksum == "sha256:" + hashlib.sha256(body.encode("utf-8")).hexdigest()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number datumdb writes")


def _check_depth(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse nesting deeper than MAX_MANIFEST_DEPTH (ours is 3 deep), iteratively: no recursion to exhaust."""
    stack: list[tuple[object, int]] = [(manifest, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_MANIFEST_DEPTH:
            raise VerificationError(f"{path}: manifest is nested more than {MAX_MANIFEST_DEPTH} levels deep")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 63


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_optional_str(value: object) -> bool:
    return value is None or isinstance(value, str)


def _is_counts(value: object) -> bool:
    return isinstance(value, dict) and all(_is_count(v) for v in value.values())


def _is_dict(value: object) -> bool:
    return isinstance(value, dict)


def _is_chunks(value: object) -> bool:
    return (
        isinstance(value, dict)
        and type(value.get("records_per_chunk")) is int
        and value["records_per_chunk"] > 0
        and isinstance(value.get("sha256"), list)
        and all(isinstance(d, str) for d in value["sha256"])
    )


def _is_file_record(value: object) -> bool:
    return isinstance(value, dict) and _is_count(value.get("bytes")) and isinstance(value.get("sha256"), str)


# field -> (check, what it must be): what readers, verify and inspect rely on
_FIELD_TYPES = {
    "count": (_is_count, "a non-negative integer"),
    "payload_bytes": (_is_count, "a non-negative integer"),
    "digest": (_is_str, "a string"),
    "dtype": (_is_optional_str, "a string or null"),
    "encoding": (_is_optional_str, "a string or null"),
    "channel_order": (_is_optional_str, "a string or null"),
    "checksum": (_is_str, "a string"),
    "shapes": (_is_counts, "an object of non-negative integer counts"),
    "shape_summary": (_is_dict, "an object"),
    "encodings": (_is_counts, "an object of non-negative integer counts"),
    "label_histogram": (_is_counts, "an object of non-negative integer counts"),
    "keys": (_is_dict, "an object"),
    "writer": (_is_dict, "an object"),
    "versions": (_is_dict, "an object"),
    "metadata": (_is_dict, "an object"),
    "chunk_digests": (_is_chunks, "an object with records_per_chunk > 0 and a list of sha256 strings"),
    "data_mdb": (_is_file_record, "an object with a byte count and a sha256 string"),
}


def _check_fields(path: Path, manifest: dict[str, Any]) -> None:
    for name, (check, expected) in _FIELD_TYPES.items():
        if name in manifest and not check(manifest[name]):
            raise VerificationError(f"{path}: manifest field {name!r} is not {expected}")
