"""Record files: one shard's serialized Datums of one split, between two pipeline steps.

A record file is a magic string, a small JSON header (what made it), then length-framed
(key, value) pairs and a trailer with the count, so truncation is detected. They are
intermediates: Snakemake deletes them (``temp()``) once the databases are built, DVC's build
stage keeps them in a private folder it removes, and neither versions them.

Everything is written to a temporary name and renamed, so a killed job leaves no half file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from datumdb.errors import InputError
from datumdb.files import replacing

__all__ = ["RECORDS_FORMAT", "read_records", "write_records"]

RECORDS_FORMAT = "datumdb-records/1"
_MAGIC = b"DATUMREC"
_FRAME = struct.Struct("<IQ")  # key length, value length


def write_records(path: str | os.PathLike[str], header: dict[str, Any], items: Iterable[tuple[bytes, bytes]]) -> Path:
    """Write a record file: magic, JSON header, length-framed (key, value) pairs, a trailer.

    Streams to a temporary file in the same folder and renames it, so memory stays at one
    record and a killed job leaves no half file under the final name.
    """
    head = json.dumps({"format": RECORDS_FORMAT, **header}, sort_keys=True).encode("utf-8")
    with replacing(path) as handle:
        handle.write(_MAGIC + struct.pack("<I", len(head)) + head)
        count = 0
        for key, value in items:
            handle.write(_FRAME.pack(len(key), len(value)))
            handle.write(key)
            handle.write(value)
            count += 1
        handle.write(_FRAME.pack(0, count))  # trailer: an empty key and the record count
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
