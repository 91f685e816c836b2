"""Read a Datum LMDB without ever touching its folder: read-only, lock-free, pinned to one version.

* ``readonly=True, lock=False``: a locking reader creates or rewrites ``lock.mdb``, which makes
  ``dvc status`` report the dataset modified and fails on a read-only folder. Our databases are
  immutable once published (the writer swaps whole folders), so no lock is needed.
* **Pinned to one version.** Nothing is opened in ``__init__``. On first use the reader opens
  ``data.mdb`` once and records what it opened (:class:`DatabaseVersion`: device, inode, size,
  mtime and the manifest's content digest). The LMDB environment is opened through that file
  descriptor (``/proc/self/fd/N`` on Linux), and the offset-index fast path maps the same
  descriptor, so single reads, batches, the fast paths, iteration, ``len``, keys and the manifest
  all come from that one file. A rebuild publishes a new folder over the old one (rename or
  exchange): the path then names a new file, but a pinned reader keeps reading the old one (its
  disk space is freed when the last reader of it closes); only new readers see the new version.
* **Other processes: the same version or** :class:`~datumdb.errors.DatabaseChangedError`. A
  pickled reader carries its path, options and pinned version; a forked one keeps it in memory.
  In the new process it opens the path again and, if the file there is not its version, raises
  ``DatabaseChangedError`` on first use. We chose raising over passing the old file on, which
  only ``fork`` could do (``spawn`` workers and other hosts cannot inherit a descriptor): one
  rule for every start method, and never a mix of versions. A reader never used before pickling
  is not pinned yet and pins to whatever it finds in the process that uses it first (call
  :meth:`DatumReader.pin` first to hand workers a definite version).
* **Closing is thread-safe.** :meth:`DatumReader.close` only drops the reader's reference to its
  pinned version. Every read and iteration holds a reference of its own while it runs, so the
  environment is closed (under the module lock, by a finalizer) when the last of them finishes,
  never while a read is using it. Nothing is counted by hand, so concurrent first use cannot
  leak an environment.
* **One environment per file per process**, shared by all readers pinned to it, because py-lmdb
  refuses a second ``open`` of a file one process has open. An environment inherited across
  ``fork`` is never used in the child: the child closes its copy and opens its own. Two folders
  may hold one file (hardlinks, reflinks, DVC's cache link identical files): they share the
  environment, but each reads with its own manifest, decode mode and digest.
* **A damaged file is an error, never a signal.** Every key and value LMDB hands out is checked
  to lie inside the file before it is copied (:mod:`datumdb.lmdbmap`), keys must increase and
  number what the meta page says, and LMDB's own reads past the file read zeros: a damaged
  ``data.mdb`` raises :class:`~datumdb.errors.DatumError` (naming the file and the key) or
  :class:`~datumdb.errors.DatabaseError` (naming the file and the record).
"""

from __future__ import annotations

import array
import contextlib
import copy
import mmap
import operator
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, overload

import lmdb
import numpy as np

from datumdb.btree import check_tree
from datumdb.codec import Datum, ImreadMode, RawLayout, datum_to_array, decode
from datumdb.errors import DatabaseChangedError, DatabaseError, DatabaseNotFoundError, DatumDBError, DatumError
from datumdb.fastpath import OffsetIndex
from datumdb.keys import MAX_KEY_BYTES
from datumdb.lmdbmap import LmdbMap, locate, map_size_for, mappings
from datumdb.manifest import DATA_NAME, decode_mode, read_manifest

__all__ = ["DatabaseVersion", "DatumReader", "open_environment", "register_folder_reader"]

_OPEN_ATTEMPTS = 5  # data.mdb replaced between our open and our check this often: give up
# Where a process can re-open its own file descriptors by name; None: open by path and check.
_FD_DIR = next((d for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), None)


class DatabaseVersion(NamedTuple):
    """The version a reader is pinned to: one ``data.mdb`` file, and its manifest's digest.

    (device, inode) name the file while anything holds it open; size and mtime catch an inode
    number reused after the old file was deleted; the digest (None without a manifest) is the
    manifest's own word on the content.
    """

    device: int
    inode: int
    size: int
    mtime_ns: int
    digest: str | None

    def __str__(self) -> str:
        return f"inode {self.inode} on device {self.device}, {self.size} bytes, digest {self.digest or 'none'}"


_PREFETCH_WINDOW = 128 << 10
"""Bytes per prefetch hint: Linux reads at most the device's readahead size (``read_ahead_kb``,
128 KiB by default) for one WILLNEED hint, so a whole file takes one hint per window."""


class _File:
    """One open ``data.mdb`` in this process, shared by every folder and reader pinned to it.

    Holds the environment, one long-lived read transaction (the file never changes, so one
    snapshot is correct and the cheapest way to read), a read-only map of the same file for the
    offset index, LMDB's own map (:class:`~datumdb.lmdbmap.LmdbMap`: every key and value is
    checked against the file before it is copied), and what is computed once per file. Two
    folders may hold this one file (hardlinks, reflinks, DVC's cache); what belongs to a folder
    (its manifest, hence its decode mode and digest) is in the :class:`_Pin` of that folder,
    never here. Every read holds a pin, and so this file, while it runs; when the last lets go,
    a finalizer closes the environment (see :func:`_pin_version`), never under a running read.
    """

    __slots__ = (
        "__weakref__",
        "_exclude",
        "_keys",
        "_layout",
        "_lmdb_map",
        "_lock",
        "_offsets",
        "data",
        "env",
        "identity",
        "length",
        "pid",
        "single_reads",
        "txn",
    )

    def __init__(
        self, folder: Path, fd: int, identity: tuple[int, int, int, int], inherited: _File | None = None
    ) -> None:
        self.identity = identity  # device, inode, size, mtime_ns
        size = identity[2]
        self.pid = _PID
        self._lock = threading.Lock()  # made in this process: a file never crosses a fork in use
        self._keys: tuple[bytes, ...] | None = None
        self._layout: RawLayout | bool | None = False  # False: not looked at yet
        self._offsets: OffsetIndex | bool | None = False
        self.single_reads = 0  # through the general path: the offset index is built after enough
        # bytes: py-lmdb encodes a str path as strict UTF-8, which a non-UTF-8 folder name is not
        name = os.fsencode(f"{_FD_DIR}/{fd}" if _FD_DIR is not None else folder / DATA_NAME)
        # The mappings of this file that are not LMDB's new one: none, unless the file was open
        # in the parent of a fork (its map is in this process too). Which one is LMDB's is found
        # later, for every file opened meanwhile at once (see lmdb_map): /proc/self/maps lists
        # every mapping, so reading it at each open would make opening n shards O(n^2).
        if inherited is None:
            self._exclude: set[int] | None = set()
        elif inherited._lmdb_map is not _UNLOCATED and inherited._lmdb_map is not None:
            self._exclude = {inherited._lmdb_map.base}
        else:
            before = mappings(identity[1])
            self._exclude = None if before is None else {m[0] for m in before}
        try:
            self.env = lmdb.open(
                name,
                subdir=False,
                readonly=True,
                lock=False,
                readahead=False,  # random access is the common case; readahead thrashes the cache
                max_readers=1,
                max_dbs=0,
                map_size=map_size_for(size),  # the file and zero pages past it (see datumdb.lmdbmap)
            )
        except lmdb.Error as exc:
            raise DatabaseError(f"{folder}: cannot open LMDB database: {exc}") from exc
        try:
            if _FD_DIR is None and _identity(folder) != identity[:2]:
                # opened by path, and the path moved on: not the file we checked
                raise DatabaseChangedError(f"{folder / DATA_NAME}: replaced while being opened; try again")
            self._lmdb_map: LmdbMap | object | None = _UNLOCATED
            _PENDING_MAPS.append(weakref.ref(self))
            # A data.mdb shorter than its last page would have LMDB read past its end: refuse it
            # as damaged (every page LMDB accepts then lies inside the file).
            page_size = int(self.env.stat()["psize"])
            needed = (int(self.env.info()["last_pgno"]) + 1) * page_size
            if size < needed:
                raise DatabaseError(f"{folder}: {DATA_NAME} is truncated ({size} bytes, its pages need {needed})")
            # The map for the offset index, of the pinned descriptor itself (mmap keeps its own dup).
            self.data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
            _check_structure(folder, self.env, self.data, page_size)
            self.txn = self.env.begin(buffers=True)  # views of the map, checked before they are copied
            self.length = int(self.txn.stat()["entries"])
        except BaseException:
            self.env.close()  # not registered yet: closed here, or py-lmdb refuses the next open
            raise

    @property
    def lmdb_map(self) -> LmdbMap | None:
        """LMDB's map of the file (None if it cannot be told): located on first use, together
        with every other file opened since (one read of /proc/self/maps for all of them)."""
        if self._lmdb_map is _UNLOCATED:
            _locate_pending_maps()
        return self._lmdb_map  # type: ignore[return-value]

    def value(self, folder: Path, key: bytes) -> bytes | None:
        """The value stored under ``key`` (None: no such key), checked to lie inside the file."""
        try:
            view = self.txn.get(key)
        except lmdb.Error as exc:
            raise DatumError(f"{folder / DATA_NAME}: damaged: LMDB cannot find this record: {exc}", key) from None
        if view is None or self.lmdb_map is None:
            return None if view is None else bytes(view)
        return self.lmdb_map.copy(view, folder, key)

    def prefetch(self) -> None:
        """Ask the kernel to read the whole file into the page cache, in the background: one
        hint per :data:`_PREFETCH_WINDOW` (a hint reads at most the device's readahead size)."""
        data = self.data
        if data is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        with contextlib.suppress(OSError, ValueError):  # a hint: where refused, reads fault pages in
            for start in range(0, len(data), _PREFETCH_WINDOW):
                data.madvise(mmap.MADV_WILLNEED, start, min(_PREFETCH_WINDOW, len(data) - start))

    def value_view(self, folder: Path, key: bytes) -> memoryview | None:
        """The value stored under ``key`` as a view of this file's own map (None: no such key).

        Checked to lie inside the file like :meth:`value`, and not copied: the view is of
        ``data`` (the map Python made of the pinned descriptor), not of LMDB's map, so it keeps
        its map alive for as long as it is held, whatever happens to the environment.
        """
        try:
            view = self.txn.get(key)
        except lmdb.Error as exc:
            raise DatumError(f"{folder / DATA_NAME}: damaged: LMDB cannot find this record: {exc}", key) from None
        if view is None:
            return None
        lmdb_map = self.lmdb_map
        if lmdb_map is None or self.data is None:
            return memoryview(bytes(view))
        offset = lmdb_map.offset(view)
        if offset is None:
            lmdb_map.copy(view, folder, key)  # raises: the value lies outside the file
        return memoryview(self.data)[offset : offset + len(view)]

    def items(self, folder: Path, values: bool = True) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` in key order (values ``b""`` unless ``values``), each checked.

        Keys and values are checked to lie inside the file before they are copied; keys must
        increase strictly and number what the meta page says, or the B-tree is damaged (a
        damaged tree can make LMDB go round in circles: the order check stops that).
        """
        checked = self.lmdb_map
        previous = b""
        count = 0
        records = None
        while True:
            try:
                if records is None:
                    records = self.txn.cursor().iternext()  # positions on the first record now
                key_view, value_view = next(records)  # views: nothing is read until checked
            except StopIteration:
                break
            except lmdb.Error as exc:
                where = f"after key {_text(previous)!r}" if count else "at the first record"
                raise DatabaseError(
                    f"{folder / DATA_NAME}: damaged: LMDB cannot read record {count} ({where}): {exc}"
                ) from None
            if checked is not None and checked.offset(key_view) is None:
                raise DatabaseError(f"{folder / DATA_NAME}: damaged: the key of record {count} lies outside the file")
            key = bytes(key_view)
            if key <= previous or count >= self.length:
                where = f"comes after key {_text(previous)!r}" if key <= previous else f"is past {self.length} records"
                raise DatabaseError(
                    f"{folder / DATA_NAME}: damaged B-tree: record {count}, key {_text(key)!r}, {where}"
                )
            previous = key
            count += 1
            if not values:
                yield key, b""
            elif checked is not None:
                yield key, checked.copy(value_view, folder, key)
            else:
                yield key, bytes(value_view)
        if count != self.length:
            raise DatabaseError(
                f"{folder / DATA_NAME}: damaged B-tree: {count} records found, its meta page says {self.length}"
            )

    def keys(self, folder: Path) -> tuple[bytes, ...]:
        keys = self._keys
        if keys is None:
            with self._lock:
                if self._keys is None:
                    self._keys = tuple(key for key, _ in self.items(folder, values=False))
                keys = self._keys
        return keys

    def raw_layout(self, folder: Path) -> RawLayout | None:
        layout = self._layout
        if layout is False:
            keys = self.keys(folder)  # not under the lock: keys() takes it
            with self._lock:
                if self._layout is False:
                    first = self.value(folder, keys[0]) if keys else None
                    self._layout = RawLayout.of(first) if first is not None else None
                layout = self._layout
        return layout  # type: ignore[return-value]

    def inherit(self, parent: _File) -> None:
        """Take what this same file's state in the parent process computed (fork only).

        The keys, the layout and the offset index are facts about the file, and the index's map
        of it is valid in a forked child: so a ``DataLoader`` worker forked from a process that
        built the index reads at full speed from its first batch instead of scanning the file.
        The environment, transaction and lock are never taken over (LMDB forbids using them).
        """
        if parent.identity != self.identity:
            return
        if parent._keys is not None:
            self._keys = parent._keys
        if parent._layout is not False:
            self._layout = parent._layout
        if parent._offsets is not False:
            self._offsets = parent._offsets

    def built_offset_index(self) -> OffsetIndex | None:
        """The offset index if it was built already (None: not built yet, or not uniform raw)."""
        offsets = self._offsets
        return None if offsets is False else offsets  # type: ignore[return-value]

    def index_for_single_reads(self, folder: Path) -> OffsetIndex | None:
        """The offset index if built, or built now that enough single reads went without it."""
        offsets = self._offsets
        if offsets is False:
            self.single_reads += 1  # not atomic across threads: a count off by a few is harmless
            if self.single_reads < _INDEX_AFTER_READS * self.length:
                return None
            return self.offset_index(folder)
        return offsets  # type: ignore[return-value]

    def offset_index(self, folder: Path) -> OffsetIndex | None:
        offsets = self._offsets
        if offsets is False:
            layout = self.raw_layout(folder)
            count = len(self.keys(folder))  # checks the B-tree once: the scan below finds the same records
            with self._lock:
                if self._offsets is False:
                    usable = layout is not None and self.data is not None and self.lmdb_map is not None
                    self._offsets = (
                        OffsetIndex.build(self.env, self.lmdb_map, self.data, layout, count)  # type: ignore[arg-type]
                        if usable
                        else None
                    )
                offsets = self._offsets
        return offsets  # type: ignore[return-value]


class _Pin:
    """One folder's version of a database in this process: its file, and its own manifest.

    ``file`` may be shared with other folders holding the same ``data.mdb`` inode; the manifest,
    the decode mode it implies and the version (whose digest is the manifest's) are this
    folder's. A reader holds its pin, and every read holds it while it runs.
    """

    __slots__ = ("auto_mode", "file", "folder", "manifest", "manifest_error", "version")

    def __init__(
        self,
        folder: Path,
        file: _File,
        version: DatabaseVersion,
        manifest: dict[str, Any] | None,
        manifest_error: Exception | None,
    ) -> None:
        self.folder = folder
        self.file = file
        self.version = version
        self.manifest = manifest
        self.manifest_error = manifest_error
        self.auto_mode: ImreadMode = decode_mode(manifest)  # type: ignore[assignment]

    @property
    def pid(self) -> int:
        return self.file.pid

    @property
    def length(self) -> int:
        return self.file.length

    @property
    def env(self) -> lmdb.Environment:
        return self.file.env

    def value(self, key: bytes) -> bytes | None:
        return self.file.value(self.folder, key)

    def value_view(self, key: bytes) -> memoryview | None:
        return self.file.value_view(self.folder, key)

    def prefetch(self) -> None:
        self.file.prefetch()

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return self.file.items(self.folder)

    def keys(self) -> tuple[bytes, ...]:
        return self.file.keys(self.folder)

    def raw_layout(self) -> RawLayout | None:
        return self.file.raw_layout(self.folder)

    def built_offset_index(self) -> OffsetIndex | None:
        return self.file.built_offset_index()

    def index_for_single_reads(self) -> OffsetIndex | None:
        return self.file.index_for_single_reads(self.folder)

    def offset_index(self) -> OffsetIndex | None:
        return self.file.offset_index(self.folder)


# The main database of a meta page: md_pad (u32), md_flags (u16) after the page header (16),
# magic, version, address, map size (24) and the free-page database (48); md_root at 128 and the
# txnid at 144.
_MAIN_DB_PAD, _MAIN_DB_FLAGS, _MAIN_DB_ROOT, _META_TXNID = 88, 92, 128, 144


def _check_structure(folder: Path, env: lmdb.Environment, data: mmap.mmap | None, page_size: int) -> None:
    """A DatabaseError unless the meta page LMDB uses and the B-tree it roots are sound.

    Caffe and datumdb write one unnamed database without flags. Flags a damaged meta page
    claims (sorted duplicates, fixed-size keys) would make LMDB read nodes as sub-pages or keys
    at strides the file never had; they are refused, and the tree is checked before LMDB walks
    it (:func:`datumdb.btree.check_tree`).
    """
    info, stat = env.info(), env.stat()
    txnid = int(info["last_txnid"])
    if data is None:
        return
    for meta in (0, page_size):  # LMDB uses the meta page with the higher txnid (the first of equals)
        if len(data) < meta + _META_TXNID + 8:
            continue
        if int.from_bytes(data[meta + _META_TXNID : meta + _META_TXNID + 8], "little") != txnid:
            continue
        pad = int.from_bytes(data[meta + _MAIN_DB_PAD : meta + _MAIN_DB_PAD + 4], "little")
        flags = int.from_bytes(data[meta + _MAIN_DB_FLAGS : meta + _MAIN_DB_FLAGS + 2], "little")
        if pad or flags:
            raise DatabaseError(
                f"{folder / DATA_NAME}: damaged meta page: the database claims flags {flags:#x} and key size {pad}, "
                "not a plain key-value database as Caffe and datumdb write"
            )
        root = int.from_bytes(data[meta + _MAIN_DB_ROOT : meta + _MAIN_DB_ROOT + 8], "little")
        problem = check_tree(
            np.frombuffer(data, dtype=np.uint8),
            page_size,
            int(info["last_pgno"]),
            root,
            int(stat["depth"]),
            int(stat["entries"]),
        )
        if problem is not None:
            raise DatabaseError(f"{folder / DATA_NAME}: damaged B-tree: {problem}")
        return
    raise DatabaseError(f"{folder / DATA_NAME}: damaged meta pages: neither is the one LMDB reads (txn {txnid})")


def _text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


# (device, inode) -> the open file in this process. Weak: a file stays open exactly as long as a
# pin (of a reader, or a read in progress) holds it.
_FILES: weakref.WeakValueDictionary[tuple[int, int], _File] = weakref.WeakValueDictionary()
# (device, inode) -> its environment, until that is closed. Outlives the file by a moment: its
# finalizer closes the environment, and until then py-lmdb refuses to open the file again.
_OPEN: dict[tuple[int, int], lmdb.Environment] = {}
_KEPT: dict[tuple[int, int], _Pin] = {}  # versions handed out by open_environment: kept for good
# Guards _FILES and _OPEN. Re-entrant: a file may die, and its finalizer run, inside a locked section.
_LOCK = threading.RLock()
_UNLOCATED = object()  # a _File's map not looked for yet
_PENDING_MAPS: list[weakref.ref[_File]] = []  # files opened since /proc/self/maps was last read
_MAPS_LOCK = threading.Lock()


def _locate_pending_maps() -> None:
    """Find LMDB's map of every file opened since the last look, from one listing of the maps."""
    with _MAPS_LOCK:
        pending = [
            file
            for ref in _PENDING_MAPS
            if (file := ref()) is not None and file._lmdb_map is _UNLOCATED and file.pid == _PID
        ]  # (a file the parent of a fork opened is never read here: its environment is not ours)
        _PENDING_MAPS.clear()
        if not pending:
            return
        listing = mappings()
        for file in pending:
            exclude = file._exclude
            if listing is None or exclude is None:
                file._lmdb_map = None
                continue
            own = {m for m in listing if m[3] == file.identity[1] and m[0] not in exclude}
            file._lmdb_map = locate(file.env, set(), file.identity[1], file.identity[2], after=own)


_PID = os.getpid()  # kept current by the fork hook: cheaper than a getpid() call per read
# Single reads build the offset index (one scan of the file) once the reads through the general
# path reach this fraction of the records: by then the scan costs about what it saves, and a
# reader used for a few look-ups never scans a large file.
_INDEX_AFTER_READS = 0.25


def _after_fork_in_child() -> None:
    # A lock held by another thread of the parent at the fork would never be released here.
    global _LOCK, _PID
    _LOCK = threading.RLock()
    _PID = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def open_environment(folder: str | os.PathLike[str]) -> lmdb.Environment:
    """The process's shared read-only, lock-free environment for a database folder.

    Prefer :class:`DatumReader`; this is for callers that need raw LMDB access with the same
    guarantees (no file in the folder is created or modified). The environment is pinned to the
    file found now and stays open until the process ends.
    """
    with _LOCK:
        pin = _pin_version(Path(folder), None)
        _KEPT[(pin.version.device, pin.version.inode)] = pin
    return pin.env


def _close_environment(key: tuple[int, int], env: lmdb.Environment) -> None:
    """Finalizer of a file: close its environment, now that no pin (reader or read) holds it."""
    with _LOCK:
        if _OPEN.get(key) is env:
            del _OPEN[key]
        env.close()  # again if _pin_version closed it first: a no-op


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(folder / DATA_NAME)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino)


def _open_file(folder: Path) -> tuple[int, os.stat_result, dict[str, Any] | None, Exception | None]:
    """Open ``data.mdb`` and read the manifest beside it, both of one version.

    The manifest is read by path, so ``data.mdb`` must still be the file we opened afterwards
    (a rebuild between the two would pair one version's data with the other's manifest).
    """
    data_path = folder / DATA_NAME
    for _ in range(_OPEN_ATTEMPTS):
        try:
            fd = os.open(data_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise DatabaseNotFoundError(f"{folder}: no {DATA_NAME} (not an LMDB database folder)") from None
        except OSError as exc:
            raise DatabaseError(f"{data_path}: cannot open: {exc}") from exc
        try:
            stat = os.fstat(fd)
            try:
                manifest: dict[str, Any] | None = read_manifest(folder)
                error: Exception | None = None
            except (DatumDBError, OSError) as exc:  # absent or damaged: readable, decoded as Caffe would
                manifest, error = None, copy.copy(exc)  # without its traceback: its frames would hold the pin
            if _identity(folder) == (stat.st_dev, stat.st_ino):
                return fd, stat, manifest, error
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise DatabaseChangedError(f"{data_path}: replaced {_OPEN_ATTEMPTS} times while being opened; try again")


def _pin_version(folder: Path, expected: DatabaseVersion | None) -> _Pin:
    """The open version of ``folder`` in this process, opening it if needed (call under _LOCK).

    With ``expected``, the file found must be that version, or DatabaseChangedError.
    """
    fd, stat, manifest, manifest_error = _open_file(folder)
    try:
        digest = manifest.get("digest") if manifest is not None else None
        version = DatabaseVersion(
            stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, digest if isinstance(digest, str) else None
        )
        if expected is not None and version != expected:
            raise DatabaseChangedError(
                f"{folder / DATA_NAME}: the database was replaced after this reader pinned its version "
                f"(pinned: {expected}; now: {version}). A reader never mixes versions: "
                "create a new DatumReader to read the new one"
            )
        key = (version.device, version.inode)
        identity = (version.device, version.inode, version.size, version.mtime_ns)
        file = inherited = _FILES.get(key)
        if file is not None and file.pid != _PID:
            file = None  # inherited across fork: never used here (but what it computed is reused)
        else:
            inherited = None
        if file is None:
            stale = _OPEN.pop(key, None)  # inherited, or its file died and the finalizer waits for us
            if stale is not None:
                stale.close()  # no read holds it: each holds its pin
            file = _FILES[key] = _File(folder, fd, identity, inherited)
            if inherited is not None:
                file.inherit(inherited)
            _OPEN[key] = file.env
            weakref.finalize(file, _close_environment, key, file.env)
        elif file.identity != identity:
            raise DatabaseChangedError(
                f"{folder / DATA_NAME}: modified in place while open in this process "
                f"(open: {DatabaseVersion(*file.identity, None)}; now: {version}); databases must be replaced whole"
            )
        counted = manifest.get("count") if manifest is not None else None
        if isinstance(counted, int) and counted != file.length:
            # e.g. a damaged meta page makes LMDB read the empty tree of the database's first one
            raise DatabaseError(
                f"{folder / DATA_NAME}: damaged: the record count is {file.length} but the manifest says {counted}"
            )
        # Another folder may hold this very file (a hardlink): the file is shared, the manifest
        # (hence decode mode and digest) is this folder's own.
        return _Pin(folder, file, version, manifest, manifest_error)
    finally:
        os.close(fd)  # the environment and the map hold descriptors of their own


# What DatumReader.__getitem__ reads single records from: (pid of the process it was set up in,
# the index's (C, H, W) view per byte offset, the record offsets, the labels). One tuple, so a
# read loads one attribute and a concurrent close() replaces the whole of it at once.
_FastReads = tuple[int, np.ndarray, "array.array[int]", "array.array[int]"]


# Folders that are read as a whole of another kind: the file that marks one -> the DatumReader
# subclass that reads it. Each kind registers itself where it is defined (a shard set in
# datumdb.shardset, which the package imports), so this module knows none of them.
_FOLDER_READERS: dict[str, type[DatumReader]] = {}


def register_folder_reader(marker: str, reader: type[DatumReader]) -> None:
    """Make ``DatumReader(folder)`` give a ``reader`` for a folder that holds the file ``marker``."""
    _FOLDER_READERS[marker] = reader


class DatumReader(Sequence[tuple[np.ndarray, int]]):
    """A database as a sequence of ``(array, label)`` in key order, pinned to one version.

    ``reader[i]`` gives a (C, H, W) array (uint8 for raw and encoded Datums, float32 for
    ``float_data``) and the int label. Raw arrays are read-only views of the record's bytes
    (``np.array(a)`` for a writable copy): once the offset index is in use (uniform raw
    databases, see :meth:`build_index`), views of the pinned file's map, which stay valid after
    :meth:`close` and keep that map alive while they do. Encoded images are decoded with OpenCV using
    ``imread``: "color" or "gray" force the channels; "unchanged" is Caffe's
    ``DecodeDatumNative``; "auto" (default) follows the manifest's channel order, so arrays have
    the shapes the manifest lists (and is "unchanged" for databases without one).

    Indices are integers (``int``, NumPy integers, anything with ``__index__``), negative ones
    counting from the end. Anything else raises TypeError rather than being rounded or parsed:
    ``reader["00000020"]`` is a lookup by key (use :meth:`get`), ``reader[2.9]`` a bug. Booleans
    are refused too, although Python counts them as integers: ``reader[mask_value]`` reading
    record 0 or 1 would hide the mistake.

    The first use pins the reader to the file it finds (see the module docstring); every later
    read, in this process or another it is pickled or forked into, comes from that version or
    raises :class:`~datumdb.errors.DatabaseChangedError`. The reader is cheap to create and to
    pickle; :meth:`close` (or ``with``) releases the environment early, otherwise it lives
    until the reader is garbage collected.
    """

    def __new__(cls, path: str | os.PathLike[str] | None = None, *args: Any, **kwargs: Any) -> DatumReader:
        """A folder of another kind opens as its own reader (:func:`register_folder_reader`): a
        folder of shards as one :class:`~datumdb.shardset.ShardSetReader`."""
        if cls is DatumReader and path is not None:
            for marker, kind in _FOLDER_READERS.items():
                if (Path(path) / marker).is_file():
                    return super().__new__(kind)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike[str], *, imread: ImreadMode | Literal["auto"] = "auto") -> None:
        if imread not in ("auto", "unchanged", "color", "gray"):
            raise ValueError(f"imread must be 'auto', 'unchanged', 'color' or 'gray', got {imread!r}")
        self.path = Path(path)
        self.imread: ImreadMode | Literal["auto"] = imread
        if not (self.path / DATA_NAME).is_file():
            raise DatabaseNotFoundError(f"{self.path}: no {DATA_NAME} (not an LMDB database folder)")
        self._version: DatabaseVersion | None = None
        self._pin: _Pin | None = None
        self._fast: _FastReads | None = None

    # -------------------------------------------------------------- the pinned version

    def __getstate__(self) -> dict[str, Any]:
        version = None if self._version is None else tuple(self._version)
        return {"path": self.path, "imread": self.imread, "version": version}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.imread = state["imread"]
        version = state.get("version")
        self._version = None if version is None else DatabaseVersion(*version)
        self._pin = None
        self._fast = None

    def _pinned(self) -> _Pin:
        pin = self._pin
        if pin is None or pin.pid != _PID:
            pin = self._open()
        return pin

    def _open(self) -> _Pin:
        with _LOCK:  # so that threads using a fresh reader together pin it once, to one version
            pin = self._pin
            if pin is None or pin.pid != _PID:
                pin = _pin_version(self.path, self._version)
                self._version = pin.version
                self._pin = pin
            return pin

    def pin(self) -> DatumReader:
        """Pin to the version at the path now (the first use does it otherwise); returns self.

        Call it before handing the reader to worker processes that should all read the same
        version: an unpinned reader pins in each process on its first use there.
        """
        self._pinned()
        return self

    @property
    def version(self) -> DatabaseVersion:
        """The version this reader reads (pinning it now if it is not pinned yet)."""
        return self._pinned().version

    def close(self) -> None:
        """Release this reader's hold on the environment; safe while other threads read.

        Reads and iterations already running keep their own reference and finish on the same
        version; the environment is closed when the last reference goes. Using the reader again
        re-opens its pinned version, or raises DatabaseChangedError if it was replaced since.
        """
        with _LOCK:  # so that a read setting up the fast path now cannot undo the close
            self._fast = None
            self._pin = None

    def __enter__(self) -> DatumReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------- sequence protocol

    def __len__(self) -> int:
        return self._pinned().length

    def keys(self) -> tuple[bytes, ...]:
        """All keys in order (loaded once per process and version, on first indexed access)."""
        return self._pinned().keys()

    def _position(self, index: Any) -> int:
        if type(index) is int:
            return index
        if isinstance(index, (bool, np.bool_)):
            raise TypeError(f"{self.path}: record indices must be integers, not {type(index).__name__}")
        try:
            return operator.index(index)
        except TypeError:
            hint = " (look a record up by key with get())" if isinstance(index, (str, bytes)) else ""
            raise TypeError(f"{self.path}: record indices must be integers, not {type(index).__name__}{hint}") from None

    def _key_at(self, pin: _Pin, index: Any) -> bytes:
        position = self._position(index)
        keys = pin.keys()
        try:
            return keys[position]
        except IndexError:
            raise IndexError(f"{self.path}: index {position} out of range for {len(keys)} records") from None

    def key(self, index: int) -> bytes:
        """The key of the record at ``index``."""
        return self._key_at(self._pinned(), index)

    @overload
    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[np.ndarray, int]]: ...
    def __getitem__(self, index: int | slice) -> tuple[np.ndarray, int] | list[tuple[np.ndarray, int]]:
        # The hot path, once this reader uses the offset index (see _FastReads): an int index in
        # the process that set it up is two array lookups and one view of the map. Everything
        # else (another process, a closed reader, other index types, out of range) goes on.
        fast = self._fast
        if fast is not None and type(index) is int and fast[0] == _PID:
            try:
                return fast[1][fast[2][index]], fast[3][index]
            except IndexError:
                pass  # out of range: the general path says so, with the path and the count
        return self._getitem(index)

    def _getitem(self, index: int | slice) -> tuple[np.ndarray, int] | list[tuple[np.ndarray, int]]:
        pin = self._pinned()
        if isinstance(index, slice):
            keys = pin.keys()
            return [self._read(pin, keys[i]) for i in range(*index.indices(pin.length))]
        position = self._position(index)
        offsets = pin.index_for_single_reads()
        if offsets is not None and -pin.length <= position < pin.length:
            self._use_index(pin, offsets)
            return offsets.record(position)
        return self._read(pin, self._key_at(pin, position))

    def _use_index(self, pin: _Pin, offsets: OffsetIndex) -> None:
        """Let ``__getitem__`` read straight from ``offsets`` while ``pin`` is this reader's."""
        if self._fast is None or self._fast[0] != pin.pid:
            with _LOCK:
                if self._pin is pin:  # not closed (or re-pinned) since the caller got the pin
                    self._fast = (pin.pid, offsets.images, offsets.record_offsets, offsets.record_labels)

    def build_index(self) -> bool:
        """Build the offset index now; True if the database has one (every record raw, one shape).

        The index is one scan of the file (about 0.6 µs a record when it is cached). Batches
        build it on their first call; single reads once they number a quarter of the records,
        or at once after this call. A fork of this process inherits it (see :class:`_Pin`).
        """
        pin = self._pinned()
        offsets = pin.offset_index()
        if offsets is not None:
            self._use_index(pin, offsets)
        return offsets is not None

    def datum(self, key_or_index: bytes | str | int) -> Datum:
        """The parsed Datum of a record, by key or index."""
        pin = self._pinned()
        if isinstance(key_or_index, (bytes, str)):
            key = _as_bytes(key_or_index)
        else:
            key = self._key_at(pin, key_or_index)
        return decode(self._value(pin, key), key)

    def value(self, key: bytes | str) -> bytes:
        """The serialized Datum stored under ``key``."""
        return self._value(self._pinned(), _as_bytes(key))

    def value_view(self, key: bytes | str) -> memoryview:
        """The serialized Datum stored under ``key``, as a read-only view of the file (no copy).

        For copying records on (the assembly of a shard set): checked to lie inside the file as
        :meth:`value` is. The view holds a map of the version this reader pinned for as long as
        it lives, so hold it only as long as needed.
        """
        key = _as_bytes(key)
        view = self._pinned().value_view(key) if 0 < len(key) <= MAX_KEY_BYTES else None
        if view is None:
            raise KeyError(f"{self.path}: no record with key {key.decode('utf-8', 'backslashreplace')!r}")
        return view

    def prefetch(self) -> None:
        """Start reading this version's ``data.mdb`` into the page cache, in the background.

        For a caller about to read every record in an order of its own (the assembly of a shard
        set): LMDB's map is opened for random access, without readahead, so a file whose pages
        left the cache since it was written (a machine reclaims what nobody read for a while)
        came back one page fault and one 4 KiB read at a time (a cold 650 MB split: 8.5 s to
        assemble, 2.9 s after a prefetch). A hint only: it reads nothing itself.
        """
        self._pinned().prefetch()

    def _value(self, pin: _Pin, key: bytes) -> bytes:
        value = pin.value(key) if 0 < len(key) <= MAX_KEY_BYTES else None
        if value is None:
            raise KeyError(f"{self.path}: no record with key {key.decode('utf-8', 'backslashreplace')!r}")
        return value

    def get(self, key: bytes | str) -> tuple[np.ndarray, int]:
        """``(array, label)`` of the record stored under ``key``."""
        return self._read(self._pinned(), _as_bytes(key))

    def _read(self, pin: _Pin, key: bytes) -> tuple[np.ndarray, int]:
        value = self._value(pin, key)
        layout = pin.raw_layout()
        if layout is not None:  # the common raw layout: two byte comparisons instead of a parse
            label = layout.label(value)
            if label is not None:
                return layout.array(value), label
        datum = decode(value, key)
        return datum_to_array(datum, imread=self._mode(pin), key=key), datum.label

    def _raw_layout(self) -> RawLayout | None:
        """The layout every record has if the database is uniform raw (checked on the first)."""
        return self._pinned().raw_layout()

    def _offset_index(self) -> OffsetIndex | None:
        """Payload offsets for a vectorized gather; None unless every record is raw and uniform."""
        return self._pinned().offset_index()

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        pin = self._pinned()
        mode = self._mode(pin)
        for key, value in pin.items():
            datum = decode(value, key)
            yield datum_to_array(datum, imread=mode, key=key), datum.label

    def datums(self) -> Iterator[tuple[bytes, Datum]]:
        """``(key, Datum)`` for every record in key order, streaming (no key list is built)."""
        pin = self._pinned()  # held by the generator: the environment stays open until it ends
        for key, value in pin.items():
            yield key, decode(value, key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """``(key, serialized value)`` for every record in key order."""
        pin = self._pinned()
        yield from pin.items()

    def read_batch(
        self, indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gather many records into one preallocated ``(N, C, H, W)`` array and an int64 label array.

        All records must decode to one shape; ``out`` (optional) must have that shape and the
        records' dtype. Works for raw, float and encoded Datums. Indices must be integers
        (TypeError for floats, strings or booleans, as for ``reader[i]``).
        """
        pin = self._pinned()
        count = pin.length
        indices = batch_indices(self.path, indices, out, count)
        index = pin.offset_index() if len(indices) else None
        if index is not None:
            shape = index.layout.shape
            if out is None:
                out = np.empty((len(indices), *shape), dtype=np.uint8)
            if out.shape[1:] == shape and out.dtype == np.uint8 and out.flags.c_contiguous:
                return out, index.gather(indices % count, out)
        labels = np.empty(len(indices), dtype=np.int64)
        keys = pin.keys()
        mode = self._mode(pin)
        for j, position in enumerate(indices):
            key = keys[position]
            datum = decode(self._value(pin, key), key)
            array = datum_to_array(datum, imread=mode, key=key)
            if out is None:
                out = np.empty((len(indices), *array.shape), dtype=array.dtype)
            if array.shape != out.shape[1:] or array.dtype != out.dtype:
                raise DatumError(f"record is {array.dtype} {array.shape}, batch is {out.dtype} {out.shape[1:]}", key)
            out[j] = array
            labels[j] = datum.label
        if out is None:
            raise ValueError("read_batch needs at least one index (or a preallocated out array)")
        return out, labels

    def _mode(self, pin: _Pin) -> ImreadMode:
        return pin.auto_mode if self.imread == "auto" else self.imread

    @property
    def decode_mode(self) -> ImreadMode:
        """The OpenCV mode encoded images are decoded with (``imread`` with "auto" resolved)."""
        return self.imread if self.imread != "auto" else self._pinned().auto_mode

    @property
    def manifest(self) -> dict[str, Any]:
        """The ``datumdb.json`` of the pinned version (DatabaseNotFoundError if it had none).

        Read once, when the version was pinned, so it describes the records this reader reads
        even after a rebuild has put another manifest at the path.
        """
        return copy.deepcopy(self._manifest_view())

    def _manifest_view(self) -> dict[str, Any]:
        """The pinned manifest itself, for this package's readers that only read it (a shard
        set's reader merges hundreds: copying each one's order hashes cost more than the merge)."""
        pin = self._pinned()
        if pin.manifest is None:
            raise copy.copy(pin.manifest_error)  # type: ignore[misc]
        return pin.manifest

    def __repr__(self) -> str:
        return f"DatumReader({str(self.path)!r})"


def batch_indices(path: Path, indices: Sequence[int] | np.ndarray, out: np.ndarray | None, count: int) -> np.ndarray:
    """``read_batch``'s indices as int64, checked: integers, in range, as many as ``out`` holds."""
    given = np.asarray(indices)
    if given.size and given.dtype.kind not in "iu":
        raise TypeError(f"{path}: record indices must be integers, not {given.dtype} values")
    given = given.reshape(-1)
    if out is not None and len(out) != len(given):
        raise ValueError(f"out holds {len(out)} records but {len(given)} indices were given")
    if len(given) and (given.min() < -count or given.max() >= count):  # before int64 wraps a uint64
        bad = given[(given < -count) | (given >= count)][0]
        raise IndexError(f"{path}: index {bad} out of range for {count} records")
    return given.astype(np.int64)


def _as_bytes(key: bytes | str) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key
