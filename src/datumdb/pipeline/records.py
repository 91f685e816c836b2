"""Record files: one shard's serialized Datums of one split, between two pipeline steps.

A record file is a magic string, a small JSON header (what made it), then length-framed
(key, value) pairs and a trailer with the count, so truncation is detected. They are
intermediates: Snakemake deletes them (``temp()``) once the databases are built, DVC's build
stage keeps them in a private folder it removes, and neither versions them.

Everything is written to a temporary name and renamed, so a killed job leaves no half file.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from datumdb.errors import InputError
from datumdb.files import replacing

__all__ = ["RECORDS_FORMAT", "RecordWriter", "read_records", "write_records"]

RECORDS_FORMAT = "datumdb-records/1"
_MAGIC = b"DATUMREC"
_FRAME = struct.Struct("<IQ")  # key length, value length


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

    def __enter__(self) -> RecordWriter:
        self._file = replacing(self.path)
        self._handle = self._file.__enter__()
        self._handle.write(_MAGIC + struct.pack("<I", len(self._head)) + self._head)
        return self

    def add(self, key: bytes, value: bytes) -> None:
        assert self._handle is not None, "RecordWriter.add outside its with block"
        self._handle.write(_FRAME.pack(len(key), len(value)))
        self._handle.write(key)
        self._handle.write(value)
        self.count += 1

    def __exit__(self, *exc_info: Any) -> None:
        assert self._file is not None and self._handle is not None
        if exc_info[0] is None:
            self._handle.write(_FRAME.pack(0, self.count))  # trailer: an empty key and the record count
        self._file.__exit__(*exc_info)


def write_records(path: str | os.PathLike[str], header: dict[str, Any], items: Iterable[tuple[bytes, bytes]]) -> Path:
    """Write a record file: magic, JSON header, length-framed (key, value) pairs, a trailer."""
    with RecordWriter(path, header) as writer:
        for key, value in items:
            writer.add(key, value)
    return Path(path)


def read_records(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Iterator[tuple[bytes, bytes]]]:
    """Open a record file: its header and an iterator of (key, value); truncation is an error."""
    path = Path(path)
    try:
        data = memoryview(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: record file not found (its records step did not run or was cleaned up)") from None
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
