"""The content digest and the ``datumdb.json`` manifest that sits beside ``data.mdb``.

``data.mdb`` bytes depend on LMDB's page size, version and commit history, so they cannot be
compared across platforms. The content digest can: it is sha256 over the (key, value) pairs in
key order, each framed by its lengths so that no two different databases hash alike (hashed in
chunks of 1024 records, see :class:`ContentDigest`). It is computed while writing (keys arrive
in order) and recomputed by ``datumdb verify``.

The manifest is plain JSON with a fixed key order and no timestamps, so the same build writes
the same bytes and DVC sees no change.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datumdb.errors import DatabaseNotFoundError, VerificationError

__all__ = [
    "MANIFEST_NAME",
    "ContentDigest",
    "decode_mode",
    "digest_items",
    "file_sha256",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME = "datumdb.json"
MANIFEST_FORMAT = "datumdb-manifest/1"
_DIGEST_DOMAIN = b"datumdb content digest v1\n"
_FRAME = struct.Struct("<IQ")  # key length (LMDB keys are < 512 bytes), value length
RECORDS_PER_CHUNK = 1024


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
        self._chunk.update(_FRAME.pack(len(key), len(value)) + bytes(key))
        self._chunk.update(value)
        self._chunk_count += 1
        self.count += 1
        if self._chunk_count == RECORDS_PER_CHUNK:
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


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (hashlib releases the GIL, so this can run in a thread)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``datumdb.json`` durably (fsync) with a stable layout: same content, same bytes.

    A ``checksum`` of the other fields is added last, so that :func:`read_manifest` notices any
    change to any byte of the file, not only to the fields verification recomputes.
    """
    path = Path(folder) / MANIFEST_NAME
    manifest = {k: v for k, v in manifest.items() if k != "checksum"}
    manifest["checksum"] = _checksum(manifest)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(_render(manifest))
        handle.flush()
        os.fsync(handle.fileno())
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load a database's manifest; a clear error if it is missing or not valid JSON."""
    path = Path(folder) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatabaseNotFoundError(f"{path}: no manifest (was this database written by datumdb?)") from None
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as exc:  # also a 5000-digit number, or nesting 1000 deep
        raise VerificationError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise VerificationError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    if manifest.get("checksum") != _checksum(manifest) or text != _render(manifest):
        raise VerificationError(f"{path}: manifest was modified or damaged (its checksum or layout does not match)")
    _check_field_types(path, manifest)
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_counter(value: Any) -> bool:
    return isinstance(value, dict) and all(_is_count(v) for v in value.values())


def _is_text_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_chunks(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and _is_count(value.get("records_per_chunk")) and value["records_per_chunk"] > 0
        and isinstance(value.get("sha256"), list) and all(isinstance(v, str) for v in value["sha256"])
    )  # fmt: skip


def _is_file_record(value: Any) -> bool:
    return isinstance(value, dict) and _is_text_or_none(value.get("sha256"))


# The fields that readers of a manifest rely on, and the type each must have when present: a
# manifest with a valid checksum can still be hand-made, and must fail here, not deep inside.
_FIELD_TYPES = {
    "count": (_is_count, "an integer >= 0"),
    "digest": (lambda v: isinstance(v, str), "a string"),
    "shapes": (_is_counter, "an object of counts"),
    "label_histogram": (_is_counter, "an object of counts"),
    "dtype": (_is_text_or_none, "a string or null"),
    "encoding": (_is_text_or_none, "a string or null"),
    "channel_order": (_is_text_or_none, "a string or null"),
    "chunk_digests": (_is_chunks, "an object with records_per_chunk >= 1 and a list of sha256 strings"),
    "data_mdb": (_is_file_record, "an object with a sha256 string"),
}


def _check_field_types(path: Path, manifest: dict[str, Any]) -> None:
    for name, (is_valid, kind) in _FIELD_TYPES.items():
        if name in manifest and not is_valid(manifest[name]):
            shown = json.dumps(manifest[name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise VerificationError(f"{path}: manifest field {name!r} must be {kind}, got {shown}")
