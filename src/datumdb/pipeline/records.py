"""Record files: one shard's serialized Datums of one split, between two pipeline steps.

A record file is a magic string, a small JSON header (what made it), then length-framed
(key, value, decoded shape) records and a trailer with the count, so truncation is detected,
then a JSON footer (the samples left out, with why) and an end mark. They are
intermediates: Snakemake deletes them (``temp()``) once the databases are built, DVC's build
stage keeps them in a private folder it removes, and neither versions them.

Everything is written to a temporary name and renamed, so a killed job leaves no half file.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from datumdb._progress import progress
from datumdb.errors import InputError
from datumdb.files import replacing

__all__ = ["RECORDS_FORMAT", "RecordFile", "RecordWriter", "read_records", "write_records"]

RECORDS_FORMAT = "datumdb-records/2"
_MAGIC = b"DATUMREC"
_END = b"DATUMEND"
_FRAME = struct.Struct("<IQIII")  # key length, value length, decoded (C, H, W) or zeros
_FOOTER = struct.Struct("<Q")  # footer length, before the end mark
Shape = tuple[int, int, int]
_DROP_EVERY = 64 << 20  # bytes of records read between two releases of their pages


class RecordWriter:
    """Write one record file, record by record; use as a context manager.

    Streams to a temporary file in the same folder, renamed over ``path`` only when the block
    ends without an error, so memory stays at one record and a killed job leaves no half file
    under the final name. Several may be open at once (one per split of a shard).
    """

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any]) -> None:
        self.path = Path(path)
        self._head = json.dumps({"format": RECORDS_FORMAT, **header}, sort_keys=True).encode("utf-8")
        self._file: contextlib.AbstractContextManager[BinaryIO] | None = None
        self._handle: BinaryIO | None = None
        self.count = 0
        self.skipped: list[dict[str, Any]] = []

    def __enter__(self) -> RecordWriter:
        self._file = replacing(self.path)
        self._handle = self._file.__enter__()
        self._handle.write(_MAGIC + struct.pack("<I", len(self._head)) + self._head)
        return self

    def add(self, key: bytes, value: bytes, shape: Shape | None = None) -> None:
        """Append a record; ``shape`` is the decoded (C, H, W) of an encoded Datum, for the manifest."""
        assert self._handle is not None, "RecordWriter.add outside its with block"
        self._handle.write(_FRAME.pack(len(key), len(value), *(shape or (0, 0, 0))))
        self._handle.write(key)
        self._handle.write(value)
        self.count += 1

    def skip(self, sample: dict[str, Any]) -> None:
        """Note a sample left out (JSON-ready: e.g. its path, list line and the reason)."""
        self.skipped.append(sample)

    def __exit__(self, *exc_info: Any) -> None:
        assert self._file is not None and self._handle is not None
        if exc_info[0] is None:
            self._handle.write(_FRAME.pack(0, self.count, 0, 0, 0))  # trailer: an empty key and the record count
            footer = json.dumps({"skipped": self.skipped}, sort_keys=True).encode("utf-8")
            self._handle.write(footer + _FOOTER.pack(len(footer)) + _END)
        self._file.__exit__(*exc_info)


def write_records(path: str | os.PathLike[str], header: dict[str, Any], items: Iterable[tuple[bytes, bytes]]) -> Path:
    """Write a record file: magic, JSON header, length-framed (key, value) pairs, trailer, footer."""
    with RecordWriter(path, header) as writer:
        for key, value in items:
            writer.add(key, value)
    return Path(path)


class RecordFile:
    """An open record file: ``header``, ``skipped`` (from the footer) and its records by iteration.

    The file is mapped, not read into memory: a shard of original photos can be gigabytes.
    Iterating yields ``(key, value, shape)`` (shape None where the record has none); a damaged
    or truncated file is an :class:`InputError` naming it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else None
                self._data = memoryview(self._map if self._map is not None else b"")
        except FileNotFoundError:
            raise InputError(
                f"{self.path}: record file not found (its records step did not run or was cleaned up)"
            ) from None
        data = self._data
        if bytes(data[: len(_MAGIC)]) != _MAGIC or len(data) < len(_MAGIC) + 4 + _FOOTER.size + len(_END):
            raise InputError(f"{self.path}: not a datumdb record file")
        (head_len,) = struct.unpack_from("<I", data, len(_MAGIC))
        start = len(_MAGIC) + 4
        self.header = self._json(data[start : start + head_len], "header")
        if self.header.get("format") != RECORDS_FORMAT:
            raise InputError(f"{self.path}: not a {RECORDS_FORMAT} file")
        self._start = start + head_len
        if bytes(data[-len(_END) :]) != _END:
            raise InputError(f"{self.path}: truncated (no end mark)")
        (footer_len,) = _FOOTER.unpack_from(data, len(data) - len(_END) - _FOOTER.size)
        self._stop = len(data) - len(_END) - _FOOTER.size - footer_len
        if not self._start <= self._stop:
            raise InputError(f"{self.path}: damaged footer")
        footer = self._json(data[self._stop : self._stop + footer_len], "footer")
        self.skipped: list[dict[str, Any]] = list(footer.get("skipped", []))

    def _json(self, raw: memoryview, what: str) -> dict[str, Any]:
        try:
            value = json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.path}: damaged {what} ({exc})") from None
        if not isinstance(value, dict):
            raise InputError(f"{self.path}: damaged {what}")
        return value

    def _drop(self, start: int, stop: int) -> int:
        """Release the mapped pages of ``[start, stop)`` from this process (they stay in the page
        cache): a build job streams gigabytes of records, and its RSS would count every one."""
        end = _page_floor(stop)
        if self._map is not None and end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        return max(start, end)

    def __iter__(self) -> Iterator[tuple[bytes, bytes, Shape | None]]:
        """The records; a long read reports its progress (a bar on a terminal, lines in a log)."""
        trailer = (
            _FRAME.unpack_from(self._data, self._stop - _FRAME.size) if self._stop - self._start >= _FRAME.size else ()
        )
        total = trailer[1] if trailer and trailer[0] == 0 else None  # the count, if the trailer is whole
        desc = f"{self.path.parent.name}/{self.path.name}"
        return progress(self._records(), enabled=None, total=total, desc=desc, unit="rec")

    def _records(self) -> Iterator[tuple[bytes, bytes, Shape | None]]:
        data, pos, count = self._data, self._start, 0
        dropped = 0
        while True:
            if pos + _FRAME.size > self._stop:
                raise InputError(f"{self.path}: truncated after {count} records")
            key_len, value_len, *shape = _FRAME.unpack_from(data, pos)
            pos += _FRAME.size
            if key_len == 0:
                if value_len != count or pos != self._stop:
                    raise InputError(f"{self.path}: damaged trailer (says {value_len} records, read {count})")
                return
            if pos + key_len + value_len > self._stop:
                raise InputError(f"{self.path}: record {count} is truncated")
            yield (
                bytes(data[pos : pos + key_len]),
                bytes(data[pos + key_len : pos + key_len + value_len]),
                tuple(shape) if shape[0] else None,  # type: ignore[misc]
            )
            pos += key_len + value_len
            count += 1
            if pos - dropped >= _DROP_EVERY:  # records are copied out: let the pages read go
                dropped = self._drop(dropped, pos)


def _page_floor(offset: int) -> int:
    return offset - offset % mmap.PAGESIZE


def read_records(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Iterator[tuple[bytes, bytes]]]:
    """Open a record file: its header and an iterator of (key, value); damage is an error."""
    records = RecordFile(path)
    return records.header, ((key, value) for key, value, _ in records)
