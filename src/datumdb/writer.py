"""Build an LMDB of Caffe Datums: batched, growing, atomic and deterministic.

What the copy-pasted scripts get wrong, and what this module does instead:

* **One transaction per sample** is slow. Records are appended in fixed-count batches
  (``batch_size``, default 1000 as in Caffe's tools) with ``putmulti(append=True)``; the count
  it returns is checked, so a key out of order can never be dropped silently.
* **A guessed map size** either wastes address space or dies with ``MapFullError``. The map
  starts small and doubles; the batch that did not fit is replayed whole (tensorpack re-puts
  only the current record and loses the rest, tensorpack#1562).
* **Writing in place** leaves half a database when the build dies. We build in a private
  ``.<name>.partial-<pid>-<random>`` folder beside the target and rename it into place only
  after success; an existing database is swapped out atomically (``renameat2`` exchange on
  Linux), so readers see the complete old or the complete new version, never a mix. Where the
  file system cannot exchange (NFS), the old version is renamed aside, the new one in, and the
  old one removed only then; a kill between the two renames leaves the old version complete
  aside, and the next build or verify renames it back. ``DATUMDB_NO_RENAME_EXCHANGE=1`` forces
  that path (what the tests use to exercise it on any file system).
* **Deleting what is not ours.** ``overwrite=True`` replaces only a folder holding nothing but
  ``data.mdb``, ``datumdb.json`` and ``lock.mdb``; ``.``, ``..``, the working directory, a
  symlink, or a folder with anything else in it is refused, and datumdb never deletes
  recursively (it unlinks its own files, then removes the folder if that left it empty).
* **Unstable bytes.** ``data.mdb`` depends on map size, commit boundaries and growth history.
  All three are fixed functions of the inputs and options here (no clocks, no random bytes:
  ``meminit`` stays on, no reader can pin pages in the private folder), so the same inputs and
  options give a byte-identical ``data.mdb``. The platform-independent identity of a database
  is its content digest, kept in the manifest.
* **lock.mdb** in outputs makes DVC see a change: the build environment is opened lock-free
  (it is private to this process), so the published folder holds only ``data.mdb`` and
  ``datumdb.json``.
* **Python per record** costs more than the disk. :meth:`DatabaseWriter.add_batch` takes a
  chunk of uint8 images at once: one NumPy copy frames the chunk's Datums, LMDB gets views into
  it, the manifest counts are updated in bulk, and the content digest is hashed in a worker
  thread while LMDB writes (:mod:`datumdb.framing`); the sha256 of ``data.mdb`` is computed
  while the final fsync runs. Same records, same commit points: the same bytes as :meth:`add`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import lmdb
import numpy as np

from datumdb import __version__
from datumdb.codec import INT32_MAX, INT32_MIN, as_chw, check_label, decode, encode_sample, shape_name
from datumdb.errors import (
    DatabaseError,
    DatabaseExistsError,
    DatumDBError,
    DatumError,
    UnsafeTargetError,
    WriteError,
)
from datumdb.framing import BackgroundDigest, frame_raw_images, index_key_digits
from datumdb.limits import MAX_MAP_SIZE
from datumdb.manifest import (
    DATA_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    RECORD_FRAME,
    RECORDS_PER_CHUNK,
    ContentDigest,
    file_sha256,
    listed_shapes,
    read_manifest,
    shape_summary,
    single_or_mixed,
    write_manifest,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAP_SIZE",
    "DatabaseWriter",
    "Encoding",
    "check_target",
    "dead_build_folders",
    "remove_stale_partials",
    "restore_interrupted_publish",
    "sniff_encoding",
    "written_by_datumdb",
]

DEFAULT_BATCH_SIZE = 1000
DEFAULT_MAP_SIZE = 64 << 20  # grows by doubling; on Linux an unused map costs nothing
# add_batch frames this many bytes of images at a time: small enough to bound memory (a few
# pieces are alive at once: being written, being hashed), big enough that NumPy and hashlib
# calls cost nothing per record.
FRAME_BYTES = 8 << 20
_COPIED_PER_HASH = 256  # add_copied records per hand-over to the digest thread
# Records handed to the commit thread at a time: it puts them into the batch's open transaction
# as they come, so when the batch's last record arrives only the commit itself is left to do
# (a batch of 1000 photos resized to 256x256 is 200 MB to copy into pages: the end of a build
# waited for all of it).
_STREAM_RECORDS = 64
LOCK_NAME = "lock.mdb"
# Everything a datumdb database folder may hold: a folder with anything else is not ours to replace.
DATABASE_FILES = frozenset({DATA_NAME, MANIFEST_NAME, LOCK_NAME})
# Build folders are named after the host and PID that own them (no "-" or "." in the host part).
# Names of private build folders carry the host and PID that made them, so a later build can tell
# a dead build's leftovers (this host, no such process) from a live one's or another node's.
HOST_TAG = socket.gethostname().split(".")[0].replace("-", "_") or "host"

Encoding = Literal["none", "png", "jpg"]


def lmdb_versions() -> dict[str, str]:
    """Versions that determine the bytes of ``data.mdb``: recorded in every manifest."""
    return {"lmdb": ".".join(map(str, lmdb.version())), "py-lmdb": lmdb.__version__}


class DatabaseWriter:
    """Write Datums to a new LMDB folder; use as a context manager.

    >>> with DatabaseWriter("data/train") as db:        # doctest: +SKIP
    ...     for image, label in samples:               # image: (C, H, W) or (H, W)
    ...         db.add(image, label)

    On normal exit the database is published at ``path``; on an exception nothing is published
    and the private build folder is removed. Keys default to ``%08d`` of the record index
    (``key_width`` digits), which sort in insertion order; explicit keys must be strictly
    increasing byte strings. ``encoding`` chooses raw Datums ("none") or PNG/JPEG-encoded ones.
    ``channel_order`` and ``metadata`` are recorded in the manifest. ``overwrite`` replaces an
    existing database (Caffe's too: the user asked); ``only_replace_own`` narrows that to one
    datumdb wrote (:func:`written_by_datumdb`), for callers that replace their own previous
    output without being asked each time (the pipeline's build steps).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        map_size: int = DEFAULT_MAP_SIZE,
        encoding: Encoding = "none",
        channel_order: str = "BGR",
        key_width: int = 8,
        metadata: dict[str, Any] | None = None,
        only_replace_own: bool = False,
        hash_file: bool = True,
        durable: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if map_size < 1:
            raise ValueError(f"map_size must be >= 1, got {map_size}")
        if encoding not in ("none", "png", "jpg"):
            raise ValueError(f"encoding must be 'none', 'png' or 'jpg', got {encoding!r}")
        self.path = Path(path)
        self.overwrite = overwrite
        self.only_replace_own = only_replace_own
        self.batch_size = batch_size
        self.initial_map_size = map_size
        self.encoding = encoding
        self.channel_order = channel_order
        self.key_width = key_width
        self.metadata = dict(metadata or {})
        self.hash_file = hash_file
        # durable=False leaves the fsyncs to the caller: a job writing hundreds of small shards
        # syncs their file system once (files.sync_folder) before it reports success, instead
        # of four fsyncs per shard. A kill still leaves nothing half-written (the renames are
        # atomic); only a power cut before that sync could.
        self.durable = durable
        self._check_target()
        if self.path.parent.is_dir():
            restored = restore_interrupted_publish(self.path)  # before anything is removed
            remove_stale_partials(self.path)
            if restored is not None:
                self._check_target()  # the restored previous version needs overwrite=True like any other
            if overwrite:
                _drop_cached_pages(self.path / DATA_NAME)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._work = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.partial-{HOST_TAG}-{os.getpid()}-", dir=self.path.parent)
        )
        os.chmod(self._work, 0o777 & ~_current_umask())  # mkdtemp's 0700 would be published as is
        try:
            self._env: lmdb.Environment | None = lmdb.open(
                os.fsencode(self._work),  # bytes: py-lmdb encodes a str as strict UTF-8
                map_size=map_size,
                subdir=True,
                lock=False,  # private folder: no other reader or writer, and no lock.mdb
                sync=False,  # one fsync at the end is enough: a crash discards the build anyway
                metasync=False,
                meminit=True,  # never write uninitialised memory: bytes must be reproducible
                max_dbs=0,
            )
        except lmdb.Error as exc:
            remove_database_folder(self._work)
            raise DatabaseError(f"{self._work}: cannot create LMDB environment: {exc}") from exc
        self._max_key = self._env.max_key_size()
        self._batch: list[tuple[bytes, bytes]] = []
        self._handed = 0  # records of _batch already handed to the commit thread
        self._first_key: bytes | None = None
        self._last_key: bytes | None = None
        self._count = 0
        self._digest = ContentDigest()
        self._hasher = BackgroundDigest(self._digest)  # add_batch's chunks are hashed in a thread
        self._labels: Counter[int] = Counter()
        self._shapes: Counter[str] = Counter()
        self._dtypes: Counter[str] = Counter()
        self._encodings: Counter[str] = Counter()
        self._payload_bytes = 0
        self.map_size = map_size
        self.grow_count = 0
        self.commit_count = 0
        self.published = False
        # Batches are committed in this thread while the next one fills: LMDB copies the values
        # and writes the pages with the GIL released, so a build of large records (photos)
        # decodes, hashes and writes at once. One commit at a time, in order: the same bytes.
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="datumdb-commit", initializer=_leave_signals_to_main)
        self._pending: deque[Future[None]] = deque()  # hand-overs to the commit thread not yet waited for
        self._txn: lmdb.Transaction | None = None  # the batch's open transaction (commit thread only)
        self._txn_records: list[tuple[bytes, bytes]] = []  # what it holds (replayed if the map grows)
        # add_copied's records are hashed in a thread of their own while LMDB writes the last batch.
        self._copy_digester = ThreadPoolExecutor(
            1, thread_name_prefix="datumdb-digest", initializer=_leave_signals_to_main
        )
        self._copied: list[tuple[bytes, bytes]] = []
        self._copy_hashing: Future[None] | None = None
        self._writeback = _Writeback(self._work / DATA_NAME)  # (durable builds only)

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return self._count

    def __enter__(self) -> DatabaseWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def next_key(self) -> bytes:
        """The default key of the next record: its zero-padded index."""
        return b"%0*d" % (self.key_width, len(self))

    def add(self, array: np.ndarray, label: int = 0, key: bytes | str | None = None) -> bytes:
        """Encode a (C, H, W) or (H, W) array as a Datum and append it; returns its key."""
        key = self._key(key)
        array = as_chw(np.asarray(array), key)
        value = encode_sample(array, label, self.encoding, key)
        dtype = "uint8" if array.dtype == np.uint8 else "float32"
        self._append(key, value, check_label(label, key), array.shape, dtype, self.encoding)
        return key

    def add_batch(self, images: np.ndarray, labels: np.ndarray | Sequence[int]) -> None:
        """Append N samples under default keys: :meth:`add` of each ``(images[i], labels[i])``, in bulk.

        ``images`` is (N, C, H, W), or (N, H, W) for gray images. The common case, uint8 images
        stored raw (``encoding="none"``) with integer labels in int32, is framed by one NumPy
        copy and its digest hashed in a worker thread (see :mod:`datumdb.framing`): no Python
        per record but two views. Records, commit points, ``data.mdb`` bytes and manifest are
        exactly those of :meth:`add` one by one (the tests compare them). Anything else (float
        or encoded images, empty images, labels of another type or beyond int32, keys past
        ``key_width`` or not after an explicit key) goes through :meth:`add` per sample, so its
        errors are :meth:`add`'s, naming the record.
        """
        if self._env is None:
            raise WriteError(f"{self.path}: the writer is closed")
        images = np.asarray(images)
        label_array = np.asarray(labels)
        if images.ndim == 0 or label_array.ndim != 1 or len(label_array) != len(images):
            raise WriteError(
                f"{self.path}: add_batch needs one label per image, got images of shape {images.shape} "
                f"and labels of shape {label_array.shape}"
            )
        if not len(images):
            return
        chunk = images[:, np.newaxis] if images.ndim == 3 else images
        if not self._batchable(chunk, label_array):
            given = label_array.tolist() if isinstance(labels, np.ndarray) else list(labels)  # 1.5 stays 1.5
            for image, label in zip(images, given, strict=True):
                self.add(image, label)
            return
        step = max(1, FRAME_BYTES // chunk[0].nbytes)
        for start in range(0, len(chunk), step):
            self._add_framed(chunk[start : start + step], label_array[start : start + step])

    def _add_framed(self, chunk: np.ndarray, label_array: np.ndarray) -> None:
        """add_batch's bulk path for a piece of about FRAME_BYTES (checked by _batchable)."""
        keys = index_key_digits(len(self), len(chunk), self.key_width)
        records = frame_raw_images(chunk, label_array, keys)
        self._hasher.submit(records)  # hashed while LMDB writes
        first_key, last_key = keys[0].tobytes(), keys[-1].tobytes()
        if self._first_key is None:
            self._first_key = first_key
        self._last_key = last_key
        count = len(chunk)
        self._count += count
        unique, counts = np.unique(label_array, return_counts=True)
        for label, times in zip(unique.tolist(), counts.tolist(), strict=True):
            self._labels[label] += times
        self._shapes[_shape_name(chunk.shape[1:])] += count
        self._dtypes["uint8"] += count
        self._encodings["none"] += count
        self._payload_bytes += int(records.bounds[-1]) - count * (RECORD_FRAME.size + keys.shape[1])
        items = records.items()
        done = 0
        while done < count:  # the commit points of add(): every batch_size records
            take = min(self.batch_size - len(self._batch), count - done)
            self._batch.extend(items[done : done + take])
            done += take
            self._stream()

    def _batchable(self, chunk: np.ndarray, labels: np.ndarray) -> bool:
        """Whether :meth:`add_batch` can frame ``chunk`` in bulk with the result of :meth:`add` per sample."""
        if self.encoding != "none" or chunk.dtype != np.uint8 or chunk.ndim != 4 or not chunk[0].size:
            return False
        if max(chunk.shape[1:]) > INT32_MAX:
            return False
        if labels.dtype.kind not in "iu":
            return False
        if int(labels.min()) < INT32_MIN or int(labels.max()) > INT32_MAX:
            return False
        last_index = len(self) + len(chunk) - 1
        if len(str(last_index)) > self.key_width or self.key_width > self._max_key:
            return False
        return self._last_key is None or self.next_key() > self._last_key

    def add_serialized(
        self, value: bytes, key: bytes | str | None = None, *, shape: tuple[int, int, int] | None = None
    ) -> bytes:
        """Append an already serialized Datum (it is parsed, not decoded, for the manifest).

        ``shape`` records the decoded (C, H, W) of an encoded Datum whose wire fields leave it
        unset (as Caffe's convert_imageset does); raw Datums carry their own shape.
        """
        key = self._key(key)
        datum = decode(value, key)
        if datum.encoded:
            encoding = sniff_encoding(datum.data)
            dtype = "uint8"
            shape = shape or (datum.shape if datum.channels else None)
        else:
            encoding = "none"
            dtype = "uint8" if len(datum.data) else "float32"
            size = datum.channels * datum.height * datum.width
            if size != (len(datum.data) or datum.float_data.size):
                raise DatumError(f"declared shape {datum.shape} does not match its payload", key)
            shape = datum.shape
        self._append(key, bytes(value), datum.label, shape, dtype, encoding)
        return key

    def add_copied(self, key: bytes, value: bytes) -> bytes:
        """Append a value copied verbatim from another datumdb database, without parsing it.

        For assembling shards: the value was checked when its own database was written and
        verified, so it is not decoded again; the manifest's per-record statistics (labels,
        shapes, dtypes, encodings) come from the sources' manifests through
        :meth:`merge_statistics`. The content digest is computed from the bytes as usual.
        """
        key = self._queue_for_digest(key, value)
        self._store(key, value)
        return key

    def add_copied_many(self, records: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        """:meth:`add_copied` of each record in order: the same database, less work per record.

        For the assembly of a shard set (views of the shards' maps: nothing is copied until LMDB
        copies it into its pages). The records are checked and counted together, the digest
        thread gets them at once, and the commit thread a whole batch at a time while the caller
        gathers the next one: handed over 64 records at a time, the two threads took turns for
        the GIL (py-lmdb takes it back after every put), and the assembly ran at half the speed
        of copying the same bytes. The commit points are the same as one record at a time.
        """
        if self._hasher:
            self._hasher.wait()
        start = 0
        while start < len(records):
            chunk = records[start : start + self.batch_size - len(self._batch)]
            start += len(chunk)
            previous = self._last_key
            if self._env is None:
                raise WriteError(f"{self.path}: the writer is closed")
            for key, _ in chunk:  # _key's checks, in one loop
                if (
                    type(key) is not bytes
                    or not key
                    or len(key) > self._max_key
                    or (previous is not None and key <= previous)
                ):
                    self._refuse_key(key, previous)
                previous = key
            self._copied.extend(chunk)
            self._hash_copied()
            if self._first_key is None:
                self._first_key = chunk[0][0]
            self._last_key = previous
            self._count += len(chunk)
            self._payload_bytes += sum(len(value) for _, value in chunk)
            if self._handed == 0:  # at most two batches held: the one committing, this one
                self._wait_commit()
            self._batch.extend(chunk)
            if len(self._batch) >= self.batch_size:
                self._flush()

    def _refuse_key(self, key: object, previous: bytes | None) -> None:
        """Raise :meth:`_key`'s error for ``key`` coming after ``previous`` (add_copied_many)."""
        if type(key) is not bytes:
            raise WriteError(f"{self.path}: keys must be bytes, got {type(key).__name__}")
        saved, self._last_key = self._last_key, previous
        try:
            self._key(key)
        finally:
            self._last_key = saved

    def _queue_for_digest(self, key: bytes, value: bytes | memoryview) -> bytes:
        """Check ``key`` and queue the record for the digest thread (add_copied, add_described)."""
        key = self._key(key)
        if self._hasher:
            self._hasher.wait()
        self._copied.append((key, value))
        if len(self._copied) >= _COPIED_PER_HASH:
            self._hash_copied()
        return key

    def add_described(
        self,
        key: bytes,
        value: bytes | memoryview,
        *,
        label: int,
        shape: tuple[int, int, int],
        encoding: str,
        dtype: str = "uint8",
    ) -> bytes:
        """Append a serialized Datum whose maker states what it holds, without parsing it again.

        For convert-imageset's workers, which made the record from a decoded image and know its
        label, (C, H, W) shape and encoding ("none" for raw pixels, else :func:`sniff_encoding`
        of the image bytes): the manifest counts them as :meth:`add_serialized` would after
        parsing. ``value`` may be a view (of shared memory, say): it is held, not copied, until
        hashed and committed, and hashed in a thread as :meth:`add_copied`'s records are.
        """
        key = self._queue_for_digest(key, value)
        self._count_record(label, shape, dtype, encoding)
        self._store(key, value)
        return key

    def _hash_copied(self) -> None:
        """Hand the copied records so far to the digest thread (one at a time, in order)."""
        if not self._copied:
            return
        if self._copy_hashing is not None:
            self._copy_hashing.result()
        pairs, self._copied = self._copied, []
        self._copy_hashing = self._copy_digester.submit(_digest_pairs, self._digest, pairs)

    def _wait_copied(self) -> None:
        self._hash_copied()
        if self._copy_hashing is not None:
            hashing, self._copy_hashing = self._copy_hashing, None
            hashing.result()

    def merge_statistics(self, statistics: dict[str, Any]) -> None:
        """Add other databases' per-record statistics (see :func:`datumdb.shardset.merged_statistics`)."""
        self._labels.update(statistics["labels"])
        self._shapes.update(statistics["shapes"])
        self._dtypes.update(statistics["dtypes"])
        self._encodings.update(statistics["encodings"])

    def close(self) -> Path:
        """Commit what is left, write the manifest and publish the database at ``path``."""
        if self.published:
            return self.path
        if self._env is None:
            raise WriteError(f"{self.path}: the writer was aborted; nothing to publish")
        try:
            self._flush()
            self._wait_commit()
            self._committer.shutdown()
            self._writeback.close()
            _check_interrupt()
            # The file's own hash lets verify notice damage anywhere in it, even in bytes no
            # record uses (free page space), which the content digest cannot see. The last
            # commit wrote its final bytes (sync and close write none), so it is hashed in a
            # thread from now on, while the content digest finishes and the fsync runs.
            with ThreadPoolExecutor(1, thread_name_prefix="datumdb-sha256") as pool:
                data_sha256 = pool.submit(file_sha256, self._work / DATA_NAME) if self.hash_file else None
                manifest = self.manifest()
                self._copy_digester.shutdown()
                self._hasher.close()
                if self.durable:
                    self._env.sync(True)
                self._env.close()
                self._env = None
                leftovers = sorted(p.name for p in self._work.iterdir() if p.name != DATA_NAME)
                if leftovers:
                    raise DatabaseError(f"{self._work}: unexpected files in the build folder: {leftovers}")
                if self.durable:
                    _fsync_file(self._work / DATA_NAME)
                manifest["chunk_digests"] = {
                    "records_per_chunk": RECORDS_PER_CHUNK,
                    "sha256": self._digest.chunk_digests,
                }
                if data_sha256 is not None:
                    manifest["data_mdb"] = {
                        "bytes": (self._work / DATA_NAME).stat().st_size,
                        "sha256": data_sha256.result(),
                    }
            write_manifest(self._work, manifest, durable=self.durable)
            if self.durable:
                _fsync_dir(self._work)
            _check_interrupt()  # the last moment a stop can still keep the previous version
            self._publish()
        except BaseException:
            self.abort()
            raise
        self.published = True
        return self.path

    def abort(self) -> None:
        """Discard the build: nothing is published and the private folder is removed."""
        # The hand-overs in flight end (their errors are the build's, raised already or moot now)
        # and the open transaction is dropped in its own thread, before the environment closes.
        futures.wait(list(self._pending))
        self._pending.clear()
        with contextlib.suppress(RuntimeError):  # (shut down already: no transaction left open)
            futures.wait([self._committer.submit(self._abort_txn)])
        self._committer.shutdown(wait=True)
        self._writeback.close()
        self._copy_digester.shutdown(wait=True)
        self._hasher.close()
        if self._env is not None:
            with contextlib.suppress(lmdb.Error):
                self._env.close()
            self._env = None
        remove_database_folder(self._work)

    def manifest(self) -> dict[str, Any]:
        """The manifest of what has been added so far (written beside data.mdb on close)."""
        self._hasher.wait()
        self._wait_copied()
        self._wait_commit()
        labels = {str(label): self._labels[label] for label in sorted(self._labels)}
        shapes = dict(self._shapes)
        summary = shape_summary(shapes)  # many sizes: a summary, and only the most common by name
        encodings = {"encodings": dict(sorted(self._encodings.items()))} if len(self._encodings) > 1 else {}
        return {
            "format": MANIFEST_FORMAT,
            "count": len(self),
            "digest": self._digest.hexdigest,
            "shapes": listed_shapes(shapes),
            **({"shape_summary": summary} if summary is not None else {}),
            "dtype": single_or_mixed(self._dtypes),
            "encoding": single_or_mixed(self._encodings),
            **encodings,
            "channel_order": self.channel_order,
            "label_histogram": labels,
            "payload_bytes": self._payload_bytes,
            "keys": {"first": _text(self._first_key), "last": _text(self._last_key)},
            "writer": {
                "batch_size": self.batch_size,
                "initial_map_size": self.initial_map_size,
                "map_size": self.map_size,
                "commits": self.commit_count,
            },
            "versions": {"datumdb": __version__, **lmdb_versions()},
            "metadata": self.metadata,
        }

    # ------------------------------------------------------------------ internals

    def _check_target(self) -> None:
        """:func:`check_target` on ``path``: run before any work and again just before publishing."""
        check_target(self.path, overwrite=self.overwrite, only_replace_own=self.only_replace_own)

    def _key(self, key: bytes | str | None) -> bytes:
        if self._env is None:
            raise WriteError(f"{self.path}: the writer is closed")
        if key is None:
            key = self.next_key()
            if len(key) > self.key_width:
                raise WriteError(f"{self.path}: record {len(self)} needs more than key_width={self.key_width} digits")
        elif isinstance(key, str):
            key = key.encode("utf-8")
        elif not isinstance(key, bytes):
            raise WriteError(f"{self.path}: keys must be bytes or str, got {type(key).__name__}")
        if not key:
            raise WriteError(f"{self.path}: empty key for record {len(self)}")
        if len(key) > self._max_key:
            raise WriteError(
                f"{self.path}: key {_text(key)!r} is {len(key)} bytes; LMDB keys are at most {self._max_key}"
            )
        if self._last_key is not None and key <= self._last_key:
            raise WriteError(
                f"{self.path}: key {_text(key)!r} is not greater than the previous key "
                f"{_text(self._last_key)!r}; keys must be unique and added in sorted order"
            )
        return key

    def _append(
        self, key: bytes, value: bytes, label: int, shape: tuple[int, ...] | None, dtype: str, encoding: str
    ) -> None:
        if self._hasher:  # add_batch's chunks go first
            self._hasher.wait()
        if self._copied or self._copy_hashing is not None:  # and add_copied's records
            self._wait_copied()
        self._digest.update(key, value)
        self._count_record(label, shape, dtype, encoding)
        self._store(key, value)

    def _count_record(self, label: int, shape: tuple[int, ...] | None, dtype: str, encoding: str) -> None:
        """Count one record in the manifest's statistics (every path that knows them ends here)."""
        self._labels[label] += 1
        self._shapes[_shape_name(shape)] += 1
        self._dtypes[dtype] += 1
        self._encodings[encoding] += 1

    def _store(self, key: bytes, value: bytes | memoryview) -> None:
        """Queue one record for the next commit (every add path ends here)."""
        self._batch.append((key, value))
        self._count += 1
        if self._first_key is None:
            self._first_key = key
        self._last_key = key
        self._payload_bytes += len(value)
        self._stream()

    def _stream(self) -> None:
        """Commit a full batch; hand the commit thread a run of new records now and then."""
        if len(self._batch) >= self.batch_size:
            self._flush()
        elif len(self._batch) - self._handed >= _STREAM_RECORDS:
            self._hand_over(final=False)

    def _flush(self) -> None:
        """Hand the rest of the batch to the commit thread, to be committed: the commit points
        (every ``batch_size`` records, and the end) are what fix the bytes of ``data.mdb``."""
        _check_interrupt()
        if not self._batch:
            return
        self._hand_over(final=True)
        self._batch, self._handed = [], 0

    def _hand_over(self, *, final: bool) -> None:
        """The batch's records not yet handed, to the commit thread (in order: it has one thread).

        A batch's first hand-over waits for the previous batch's commit, so at most two batches
        are held (the one committing, the one filling): what the decoding ring is sized for."""
        if self._handed == 0:
            self._wait_commit()
        else:
            while self._pending and self._pending[0].done():  # a failed put stops the build now
                self._pending.popleft().result()
        records = self._batch[self._handed :]
        self._handed = len(self._batch)
        self._pending.append(self._committer.submit(self._put, records, final))

    def _wait_commit(self) -> None:
        """Wait for every hand-over; the first error (a WriteError, a DatabaseError) is raised here."""
        while self._pending:
            self._pending.popleft().result()

    def _put(self, records: list[tuple[bytes, bytes]], final: bool) -> None:
        """In the commit thread: put ``records`` in the batch's transaction (begun if none is
        open), then commit it if ``final``. On MapFullError the map doubles and the batch's
        records so far are put again in a new transaction: the same records, the same commit
        points, the same bytes."""
        assert self._env is not None
        self._txn_records.extend(records)
        fresh = records
        while True:
            try:
                if self._txn is None:
                    self._txn = self._env.begin(write=True)
                    fresh = self._txn_records
                if fresh:
                    consumed, added = self._txn.cursor().putmulti(fresh, append=True)
                    if consumed != len(fresh) or added != len(fresh):
                        raise WriteError(
                            f"{self.path}: LMDB stored {added} of {len(fresh)} records of the batch "
                            f"starting at key {_text(bytes(self._txn_records[0][0]))!r}"
                        )
                if final:
                    txn, self._txn = self._txn, None
                    txn.commit()
                break
            except lmdb.MapFullError:
                self._abort_txn()
                if self.map_size * 2 > MAX_MAP_SIZE:
                    raise DatabaseError(f"{self.path}: map size would exceed {MAX_MAP_SIZE} bytes") from None
                self.map_size *= 2
                self.grow_count += 1
                self._env.set_mapsize(self.map_size)
            except lmdb.Error as exc:
                self._abort_txn()
                raise DatabaseError(
                    f"{self.path}: LMDB could not write the batch starting at key "
                    f"{_text(bytes(self._txn_records[0][0]))!r}: {exc} "
                    "(is the disk full, or a file size limit reached?)"
                ) from exc
            except BaseException:
                self._abort_txn()
                raise
        if final:
            self._txn_records = []
            self.commit_count += 1
            if self.durable:
                self._writeback.start()

    def _abort_txn(self) -> None:
        """In the commit thread: drop the open transaction, if any (a failed or abandoned batch)."""
        if self._txn is not None:
            txn, self._txn = self._txn, None
            with contextlib.suppress(lmdb.Error):
                txn.abort()

    def _publish(self) -> None:
        """Move the finished build to ``path``; the previous version stays complete until then.

        Three ways, best first: a plain rename (target absent or an empty folder); an atomic
        ``renameat2`` exchange with the previous version; where that is missing (NFS, other
        systems) the previous version is renamed aside, the new one in, and only then is the
        aside copy removed. SIGINT and SIGTERM are held back across those renames, so a
        scheduler's stop lands before or after them; a kill -9 between the two renames leaves
        the target absent and the previous version complete aside, which the next build (or
        verify) renames back (:func:`restore_interrupted_publish`).
        """
        self._check_target()
        target = self.path
        previous: Path | None = None
        with _signals_held():
            try:
                # Atomic when the target is absent or an empty folder (Snakemake pre-creates one).
                os.rename(self._work, target)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if not self.overwrite:  # another build published here since we checked
                    raise DatabaseExistsError(f"{target}: a database appeared here during the build") from None
                if _exchange(self._work, target):
                    previous = self._work  # now holds the previous version
                else:
                    previous = self._aside_and_rename(target)
        if self.durable:
            _fsync_dir(target.parent)
        if previous is not None:
            remove_database_folder(previous)

    def _aside_and_rename(self, target: Path) -> Path:
        """The fallback without an atomic exchange: previous version aside, new one in."""
        aside = target.parent / f".{target.name}.old-{HOST_TAG}-{os.getpid()}-{os.urandom(4).hex()}"
        os.rename(target, aside)
        try:
            os.rename(self._work, target)
        except BaseException:
            with contextlib.suppress(OSError):  # fails only if another build published meanwhile
                os.rename(aside, target)
            raise
        return aside


_shape_name = functools.lru_cache(maxsize=256)(shape_name)


_INTERRUPTED = threading.Event()


def note_interrupt() -> None:
    """Record that SIGINT or SIGTERM asked this process to stop (before raising KeyboardInterrupt).

    A KeyboardInterrupt raised by a signal handler can be lost on its way up: NumPy calls small
    Python helpers from C and drops any exception they raise, and a handler may run inside one
    (measured: 1 SIGTERM in about 40 while a build framed records). The writer checks this
    flag before each commit and before publishing, so a stopped build never publishes.
    """
    _INTERRUPTED.set()


def clear_interrupt() -> None:
    """Forget an earlier :func:`note_interrupt` (a new command in the same process)."""
    _INTERRUPTED.clear()


def _check_interrupt() -> None:
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


def _leave_signals_to_main() -> None:
    """Block SIGINT and SIGTERM in a helper thread, so the kernel hands them to the main thread.

    Python runs handlers in the main thread only; a signal the kernel gave to this thread while
    the main thread waited for it (for a commit to end) was seen too late, or not at all:
    measured, one SIGTERM in 18 did not stop a build. A thread that blocks them gets none.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _digest_pairs(digest: ContentDigest, pairs: list[tuple[bytes, bytes]]) -> None:
    for key, value in pairs:
        digest.update(key, value)


def _text(key: bytes | None) -> str | None:
    return None if key is None else key.decode("utf-8", "backslashreplace")


def sniff_encoding(data: memoryview | bytes) -> str:
    """What encoded image bytes are, as manifests count them: "png", "jpg" or "other"."""
    head = bytes(data[:8])
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpg"
    return "other"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_cached_pages(data: Path) -> None:
    """Let the kernel drop the cached pages of the version a build is about to replace.

    Its pages then serve the new version's writes. Otherwise the new file needs as many pages
    again, and where freed memory goes back to the host (a VM's free page reporting: this
    machine), taking it back cost more than writing: a 650 MB assembly ran 7-8.5 s instead of 2 s
    (5-6 s of it in the kernel). Readers of the old version read it from disk again meanwhile;
    nothing else changes (clean pages only, and only a hint)."""
    with contextlib.suppress(OSError, AttributeError):  # missing, unreadable, or no posix_fadvise
        descriptor = os.open(data, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if stat.S_ISREG(os.fstat(descriptor).st_mode):
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        _fsync_file(path)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYNC_FILE_RANGE_WRITE = 2


class _Writeback:
    """Starts the kernel writing a file's dirty pages to disk after each commit, without waiting.

    A build commits without fsync (one at the end is enough: a crash discards the build), so
    every page it wrote would still be in memory at the end, and the final fsync would write
    the whole file while nothing else runs: about a fifth of a 600 MB build's wall time. Linux's
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` queues the writes as the build goes, in the commit
    thread, so the final fsync finds little left. It changes no byte and no durability promise
    (the final fsync still comes first); elsewhere, or if the call fails, it does nothing.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None
        self._call: Any = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                self._call = ctypes.CDLL(None, use_errno=True).sync_file_range
                self._call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)

    def start(self) -> None:
        if self._call is None:
            return
        if self._fd is None:
            try:
                self._fd = os.open(self._path, os.O_RDONLY)
            except OSError:
                self._call = None
                return
        if self._call(self._fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
            self._call = None  # not supported here: the final fsync does it all

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# Set to 1 to publish without renameat2's exchange, as on file systems that lack it (NFS): what
# the tests use to exercise the fallback on any machine. Read here only.
NO_EXCHANGE_VARIABLE = "DATUMDB_NO_RENAME_EXCHANGE"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two folders (Linux renameat2); False where that is not available."""
    if not sys.platform.startswith("linux") or os.environ.get(NO_EXCHANGE_VARIABLE, "") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then deliver them.

    Python runs signal handlers in the main thread only, so that is the thread to protect
    (from another thread there is nothing to do). Masking signals is not enough: the kernel
    hands a process-directed signal to any thread that does not block it (NumPy's BLAS threads,
    say) and Python then runs the handler in the main thread anyway. So the handlers are
    swapped for one that only records the signal, and the recorded signals are raised again,
    with the previous handlers back in place, once the block is over.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if handler is None or handler == signal.SIG_IGN:  # set outside Python, or ignored anyway
            continue
        previous[number] = signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)


def check_target(path: Path, *, overwrite: bool, only_replace_own: bool = False) -> None:
    """Refuse any target that is not absent, an empty folder, or a folder of datumdb's own files.

    ``--overwrite`` must replace a previous database, never a user's folder that was named by
    mistake (``.``, the working directory, the folder holding the inputs); ``only_replace_own``
    narrows it to a database datumdb wrote (:func:`written_by_datumdb`). Builds that write several
    databases check every target before any work.
    """
    if path.name in ("", ".", ".."):
        raise UnsafeTargetError(f"{path}: not a database folder name; name a new folder, such as {path / 'db'}")
    if path.is_symlink():
        raise UnsafeTargetError(f"{path}: is a symlink; datumdb publishes only into a real folder")
    if path.exists() and not path.is_dir():
        raise UnsafeTargetError(f"{path}: exists and is not a database folder")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UnsafeTargetError(f"{path}: is the working directory or contains it; name a new folder")
    if not path.is_dir():
        return
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise UnsafeTargetError(
            f"{path}: holds {shown}, which datumdb did not write; a database folder holds only "
            f"{DATA_NAME}, {MANIFEST_NAME} and {LOCK_NAME}. Refusing to "
            f"{'replace' if overwrite else 'publish into'} it: choose another folder or move them"
        )
    if not overwrite and any(path.iterdir()):
        raise DatabaseExistsError(f"{path}: already holds a database; pass overwrite=True (--overwrite) to replace it")
    # (A folder without data.mdb holds no data: a lone lock.mdb, say, left by a reader.)
    if only_replace_own and (path / DATA_NAME).exists() and not written_by_datumdb(path):
        raise UnsafeTargetError(
            f"{path}: holds a database datumdb did not write (no valid {MANIFEST_NAME}: made by Caffe or "
            "another tool?); refusing to replace it: move it away or choose another folder"
        )


def restore_interrupted_publish(target: str | os.PathLike[str]) -> Path | None:
    """Put back the previous version of ``target`` that a killed publish left aside.

    Where no atomic exchange exists, a rebuild renames the previous version to
    ``.NAME.old-HOST-PID-*`` before renaming the new one in; a kill -9 between the two leaves
    ``target`` absent. If ``target`` is absent (or an empty folder: Snakemake creates one before
    rerunning the job) and such a folder of a dead process of this host holds a complete
    database, it is renamed back (the newest, if several) and its path returned. Builds call
    this first, and so does verify; it never deletes anything.
    """
    target = Path(target)
    if not target.parent.is_dir() or target.is_symlink():
        return None
    if target.exists() and not (target.is_dir() and next(target.iterdir(), None) is None):
        return None
    candidates = [folder for kind, folder in dead_build_folders(target) if kind == "old" and written_by_datumdb(folder)]
    candidates.sort(key=lambda folder: (folder / MANIFEST_NAME).stat().st_mtime_ns)
    for folder in reversed(candidates):
        try:
            os.rename(folder, target)
        except OSError:  # another process restored or published first
            return None
        _fsync_dir(target.parent)
        return target
    return None


def written_by_datumdb(folder: Path) -> bool:
    """Whether ``folder`` holds a whole database datumdb wrote: only its files, a manifest whose
    checksum holds, and a data.mdb of the size that manifest recorded.

    The manifest is datumdb's mark of ownership: what may be restored after a killed publish,
    and what a build that was not asked to (the pipeline's) may replace."""
    try:
        if foreign_entries(folder) or not (folder / DATA_NAME).is_file():
            return False
        manifest = read_manifest(folder)
        expected = manifest.get("data_mdb", {}).get("bytes")
        return expected is None or (folder / DATA_NAME).stat().st_size == expected
    except (OSError, DatumDBError):
        return False


def foreign_entries(folder: Path) -> list[str]:
    """Sorted names in ``folder`` that are not datumdb's own files (sub-folders end in ``/``).

    datumdb's files are the regular files ``data.mdb``, ``datumdb.json`` and ``lock.mdb``; a
    symlink or a folder under one of those names is foreign too.
    """
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name in DATABASE_FILES and entry.is_file(follow_symlinks=False):
                continue
            names.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return sorted(names)


def remove_database_folder(folder: Path) -> bool:
    """Remove a folder datumdb made: its own files, then the folder itself if that left it empty.

    Never a recursive delete: anything else in the folder stays, and so does the folder (the
    result is then False). The manifest goes first, so a removal cut short leaves a folder that
    is visibly incomplete (and never restored as a previous version).
    """
    for name in (MANIFEST_NAME, DATA_NAME, LOCK_NAME):
        file = folder / name
        if file.is_file() and not file.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
    try:
        os.rmdir(folder)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def dead_build_folders(target: Path) -> list[tuple[str, Path]]:
    """``(kind, folder)`` of the build (``partial``) and aside (``old``) folders of ``target``
    that this host's dead processes left.

    The folder names carry host and PID, so on a shared file system (a cluster) a live build on
    another node is never mistaken for a dead one here.
    """
    prefix = f".{target.name}."
    found = []
    for candidate in sorted(target.parent.iterdir()):
        if not candidate.name.startswith(prefix) or candidate.is_symlink() or not candidate.is_dir():
            continue
        kind, _, rest = candidate.name[len(prefix) :].partition("-")
        host, _, rest = rest.partition("-")
        pid_text = rest.split("-", 1)[0]
        if kind in ("partial", "old") and host == HOST_TAG and pid_text.isdigit() and not process_alive(int(pid_text)):
            found.append((kind, candidate))
    return found


def remove_stale_partials(target: Path) -> None:
    """Delete the folders killed builds of ``target`` left; one holding anything but datumdb's
    files is left alone (it is no longer only ours)."""
    for _, folder in dead_build_folders(target):
        if not foreign_entries(folder):
            remove_database_folder(folder)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (this process always does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
