"""Read a Datum LMDB without ever touching its folder: read-only, lock-free, fork and spawn safe.

* ``readonly=True, lock=False``: a locking reader creates or rewrites ``lock.mdb``, which makes
  ``dvc status`` report the dataset modified and fails on a read-only folder. Our databases are
  immutable once published (the writer swaps whole folders), so no lock is needed.
* **Lazy, per process.** Nothing is opened in ``__init__``; the environment is opened on first
  use and re-opened after a fork (the inherited one is closed in the child, never used), and a
  pickled reader carries only its path and options. So a reader can be handed to
  ``multiprocessing`` or PyTorch ``DataLoader`` workers with either start method.
* **One environment per path per process**, shared by all readers of that path, because
  py-lmdb refuses a second ``open`` of the same path in one process.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import lmdb
import numpy as np

from datumdb.codec import Datum, ImreadMode, datum_to_array, decode
from datumdb.errors import DatabaseError, DatabaseNotFoundError, DatumDBError, DatumError
from datumdb.fastpath import OffsetIndex, RawLayout
from datumdb.manifest import decode_mode, read_manifest

__all__ = ["DatumReader", "open_environment"]

DATA_NAME = "data.mdb"
_MAX_KEY_SIZE = 511  # LMDB's compiled-in limit: no longer key can be stored, so none is found


class _SharedEnvironment:
    __slots__ = ("env", "pid", "users")

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.pid = os.getpid()
        self.users = 0


_ENVIRONMENTS: dict[tuple[int, int], _SharedEnvironment] = {}
_ENV_LOCK = threading.Lock()


def open_environment(folder: str | os.PathLike[str]) -> lmdb.Environment:
    """The process's shared read-only, lock-free environment for a database folder.

    Prefer :class:`DatumReader`; this is for callers that need raw LMDB access with the same
    guarantees (no file in the folder is created or modified).
    """
    return _acquire(Path(folder))[1]


def _file_identity(folder: Path) -> tuple[int, int]:
    """(device, inode) of ``data.mdb``: what py-lmdb means by "the same environment".

    A rebuild publishes a new ``data.mdb`` (a new inode) at the same path, so keying on the
    path would hand new readers the replaced version's environment.
    """
    try:
        stat = (folder / DATA_NAME).stat()
    except FileNotFoundError:
        raise DatabaseNotFoundError(f"{folder}: no {DATA_NAME} (not an LMDB database folder)") from None
    return (stat.st_dev, stat.st_ino)


def _acquire(folder: Path) -> tuple[tuple[int, int], lmdb.Environment]:
    identity = _file_identity(folder)
    with _ENV_LOCK:
        shared = _ENVIRONMENTS.get(identity)
        if shared is not None and shared.pid != os.getpid():
            # Inherited across fork: the parent's handle must not be used here. Closing the
            # child's copy only unmaps it in this process (lock-free: no shared lock table).
            shared.env.close()
            shared = None
        if shared is None:
            try:
                env = lmdb.open(
                    os.fsencode(folder),  # bytes: py-lmdb encodes a str as strict UTF-8
                    readonly=True,
                    lock=False,
                    subdir=True,
                    readahead=False,  # random access is the common case; readahead thrashes the cache
                    max_readers=1,
                    max_dbs=0,
                )
            except lmdb.Error as exc:
                raise DatabaseError(f"{folder}: cannot open LMDB database: {exc}") from exc
            _check_not_truncated(env, folder)
            shared = _ENVIRONMENTS[identity] = _SharedEnvironment(env)
        shared.users += 1
        return identity, shared.env


def _check_not_truncated(env: lmdb.Environment, folder: Path) -> None:
    """Refuse a ``data.mdb`` shorter than its last page: reading that page through the map would
    kill the process with SIGBUS instead of raising an error."""
    needed = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    size = (folder / DATA_NAME).stat().st_size
    if size < needed:
        env.close()
        raise DatabaseError(f"{folder}: {DATA_NAME} is truncated ({size} bytes, its pages need {needed})")


def _release(identity: tuple[int, int]) -> None:
    with _ENV_LOCK:
        shared = _ENVIRONMENTS.get(identity)
        if shared is None or shared.pid != os.getpid():
            return
        shared.users -= 1
        if shared.users <= 0:
            shared.env.close()
            del _ENVIRONMENTS[identity]


class DatumReader(Sequence[tuple[np.ndarray, int]]):
    """A database as a sequence of ``(array, label)`` in key order.

    ``reader[i]`` gives a (C, H, W) array (uint8 for raw and encoded Datums, float32 for
    ``float_data``) and the int label. Raw arrays are read-only views of the record's bytes
    (``np.array(a)`` for a writable copy). Encoded images are decoded with OpenCV using
    ``imread``: "color" or "gray" force the channels; "unchanged" is Caffe's
    ``DecodeDatumNative``; "auto" (default) follows the manifest's channel order, so arrays have
    the shapes the manifest lists (and is "unchanged" for databases without one).

    The reader is cheap to create and to pickle; call :meth:`close` (or use ``with``) to release
    the environment early, otherwise it lives until the process ends.
    """

    def __init__(self, path: str | os.PathLike[str], *, imread: ImreadMode | Literal["auto"] = "auto") -> None:
        if imread not in ("auto", "unchanged", "color", "gray"):
            raise ValueError(f"imread must be 'auto', 'unchanged', 'color' or 'gray', got {imread!r}")
        self.path = Path(path)
        self.imread: ImreadMode | Literal["auto"] = imread
        if not (self.path / DATA_NAME).is_file():
            raise DatabaseNotFoundError(f"{self.path}: no {DATA_NAME} (not an LMDB database folder)")
        self._reset()

    def _reset(self) -> None:
        self._env: lmdb.Environment | None = None
        self._identity: tuple[int, int] = (0, 0)
        self._txn: lmdb.Transaction | None = None
        self._pid: int | None = None
        self._keys: tuple[bytes, ...] | None = None
        self._length: int | None = None
        self._decode_mode: ImreadMode | None = None
        self._layout: RawLayout | bool | None = False  # False: not looked at yet in this process
        self._offsets: OffsetIndex | bool | None = False

    # -------------------------------------------------------------- process-local state

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "imread": self.imread}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.imread = state["imread"]
        self._reset()

    def _transaction(self) -> lmdb.Transaction:
        pid = os.getpid()
        if self._txn is None or self._pid != pid:
            if self._pid is not None and self._pid != pid:
                self._reset()  # forked: drop the parent's handles without touching them
            self._identity, self._env = _acquire(self.path)
            self._pid = pid
            # The database never changes under us (the writer swaps whole folders), so one
            # long-lived read transaction is both correct and the cheapest way to read.
            self._txn = self._env.begin(buffers=False)
        return self._txn

    def close(self) -> None:
        """Release this reader's hold on the environment (it reopens if used again)."""
        if self._txn is not None and self._pid == os.getpid():
            self._txn.abort()
            _release(self._identity)
        self._reset()

    def __del__(self) -> None:
        # A forgotten reader must not pin the environment (and block lmdb.open of the path).
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> DatumReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------- sequence protocol

    def __len__(self) -> int:
        if self._length is None or self._pid != os.getpid():
            self._length = int(self._transaction().stat()["entries"])
        return self._length

    def keys(self) -> tuple[bytes, ...]:
        """All keys in order (loaded once per process, on first indexed access)."""
        txn = self._transaction()
        if self._keys is None:
            self._keys = tuple(txn.cursor().iternext(keys=True, values=False))
        return self._keys

    def key(self, index: int) -> bytes:
        keys = self.keys()
        try:
            return keys[index]
        except IndexError:
            raise IndexError(f"{self.path}: index {index} out of range for {len(keys)} records") from None
        except TypeError:
            raise TypeError(f"indices must be integers, not {type(index).__name__}") from None

    @overload
    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[np.ndarray, int]]: ...
    def __getitem__(self, index: int | slice) -> tuple[np.ndarray, int] | list[tuple[np.ndarray, int]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.get(self.key(int(index)))

    def datum(self, key_or_index: bytes | str | int) -> Datum:
        """The parsed Datum of a record, by key or index."""
        key = self._as_key(key_or_index)
        return decode(self.value(key), key)

    def value(self, key: bytes | str) -> bytes:
        """The serialized Datum stored under ``key``."""
        key = key.encode("utf-8") if isinstance(key, str) else key
        value = self._transaction().get(key) if 0 < len(key) <= _MAX_KEY_SIZE else None
        if value is None:
            raise KeyError(f"{self.path}: no record with key {key.decode('utf-8', 'backslashreplace')!r}")
        return value

    def get(self, key: bytes | str) -> tuple[np.ndarray, int]:
        """``(array, label)`` of the record stored under ``key``."""
        key = key.encode("utf-8") if isinstance(key, str) else key
        value = self.value(key)
        layout = self._raw_layout()
        if layout is not None:  # the common raw layout: two byte comparisons instead of a parse
            label = layout.label(value)
            if label is not None:
                return layout.array(value), label
        datum = decode(value, key)
        return datum_to_array(datum, imread=self.decode_mode, key=key), datum.label

    def _raw_layout(self) -> RawLayout | None:
        if self._layout is False or self._pid != os.getpid():
            first = next(iter(self.items()), None)
            self._layout = RawLayout.of(first[1]) if first is not None else None
        return self._layout  # type: ignore[return-value]

    def _offset_index(self) -> OffsetIndex | None:
        """Payload offsets for a vectorized gather; None unless every record is raw and uniform."""
        layout = self._raw_layout()
        if self._offsets is False:
            self._transaction()  # opens the environment in this process
            self._offsets = None if layout is None else OffsetIndex.build(self._env, self.path / DATA_NAME, layout)
        return self._offsets  # type: ignore[return-value]

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for key, datum in self.datums():
            yield datum_to_array(datum, imread=self.decode_mode, key=key), datum.label

    def datums(self) -> Iterator[tuple[bytes, Datum]]:
        """``(key, Datum)`` for every record in key order, streaming (no key list is built)."""
        for key, value in self._transaction().cursor():
            yield key, decode(value, key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """``(key, serialized value)`` for every record in key order."""
        yield from self._transaction().cursor()

    def read_batch(
        self, indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gather many records into one preallocated ``(N, C, H, W)`` array and an int64 label array.

        All records must decode to one shape; ``out`` (optional) must have that shape and the
        records' dtype. Works for raw, float and encoded Datums.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if out is not None and len(out) != len(indices):
            raise ValueError(f"out holds {len(out)} records but {len(indices)} indices were given")
        count = len(self)
        if len(indices) and (indices.min() < -count or indices.max() >= count):
            bad = indices[(indices < -count) | (indices >= count)][0]
            raise IndexError(f"{self.path}: index {bad} out of range for {count} records")
        index = self._offset_index() if len(indices) else None
        if index is not None:
            shape = index.layout.shape
            if out is None:
                out = np.empty((len(indices), *shape), dtype=np.uint8)
            if out.shape[1:] == shape and out.dtype == np.uint8 and out.flags.c_contiguous:
                return out, index.gather(indices % count, out)
        labels = np.empty(len(indices), dtype=np.int64)
        keys = self.keys()
        for j, index in enumerate(indices):
            try:
                key = keys[index]
            except IndexError:
                raise IndexError(f"{self.path}: index {index} out of range for {len(keys)} records") from None
            datum = decode(self.value(key), key)
            array = datum_to_array(datum, imread=self.decode_mode, key=key)
            if out is None:
                out = np.empty((len(indices), *array.shape), dtype=array.dtype)
            if array.shape != out.shape[1:] or array.dtype != out.dtype:
                raise DatumError(f"record is {array.dtype} {array.shape}, batch is {out.dtype} {out.shape[1:]}", key)
            out[j] = array
            labels[j] = datum.label
        if out is None:
            raise ValueError("read_batch needs at least one index (or a preallocated out array)")
        return out, labels

    @property
    def decode_mode(self) -> ImreadMode:
        """The OpenCV mode encoded images are decoded with (``imread`` with "auto" resolved)."""
        if self.imread != "auto":
            return self.imread
        if self._decode_mode is None:
            try:
                manifest: dict[str, Any] | None = read_manifest(self.path)
            except DatumDBError:  # absent or damaged: decode as Caffe would
                manifest = None
            self._decode_mode = decode_mode(manifest)  # type: ignore[assignment]
        return self._decode_mode  # type: ignore[return-value]

    @property
    def manifest(self) -> dict[str, Any]:
        """The ``datumdb.json`` written beside ``data.mdb`` (DatabaseNotFoundError if absent)."""
        return read_manifest(self.path)

    def _as_key(self, key_or_index: bytes | str | int) -> bytes:
        if isinstance(key_or_index, (int, np.integer)):
            return self.key(int(key_or_index))
        return key_or_index.encode("utf-8") if isinstance(key_or_index, str) else key_or_index

    def __repr__(self) -> str:
        return f"DatumReader({str(self.path)!r})"
