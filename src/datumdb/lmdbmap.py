"""LMDB's map of one ``data.mdb``: where it is, and which addresses lie inside the file.

LMDB reads a database through one ``mmap`` of ``data.mdb`` and trusts what it finds there. A
page number is checked (a page past the last one is ``MDB_PAGE_NOTFOUND``), but nothing else: a
damaged 4-byte value length in a leaf node, or a damaged overflow page number, makes LMDB hand
out a value that runs past the end of the file, and a damaged node offset or key size in one of
the last pages makes LMDB itself read past it. Touching a mapped address past the end of a file
kills the process with SIGBUS (or SIGSEGV past the map), and Python cannot catch either. So:

* **Where the map is.** ``mdb_env_info`` reports the fixed map address recorded in the file's
  meta page (``env.info()["map_addr"]`` is 0 unless ``MDB_FIXEDMAP``), not where LMDB mapped it,
  and a base derived from a page number in the file can be forged (a crafted file once made the
  offset index serve the previous record's pixels). The base comes from the kernel instead: the
  mapping that appeared in ``/proc/self/maps`` (see proc(5)) when the environment was opened,
  with file offset 0 and exactly the length LMDB reports as its map size.
* **Values are checked before they are touched.** :meth:`LmdbMap.copy` takes the buffer py-lmdb
  returns (``buffers=True``: a view of the map, nothing read yet), checks that it lies inside
  ``[base, base + file size)``, and only then copies it.
* **LMDB's own reads past the end read zeros.** The environment is opened with a map
  :data:`REACH` bytes longer than the file, and that part of the map is replaced by anonymous
  zero pages (``mmap(MAP_FIXED)`` over LMDB's own mapping). LMDB never reads more than 128 KiB
  past the start of a page it accepted (a 16-bit node offset, then a 16-bit key size), and every
  page it accepts lies inside the file, so its reads stay inside the map and read zeros instead
  of faulting; the damage then shows as keys out of order or a value outside the file, which
  the reader reports.

Where ``/proc/self/maps`` is missing (not Linux) the map cannot be located: :func:`locate`
returns None and values are copied unchecked, as LMDB serves them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import sys
from pathlib import Path

import lmdb
import numpy as np

from datumdb.errors import DatumError

__all__ = ["BUFFER_FIELD", "REACH", "LmdbMap", "buffer_address", "locate", "map_size_for", "mappings", "numpy_address"]

REACH = 1 << 18
"""How far past the file the map extends (zero pages): more than LMDB can read past the start of
a page (a node offset and a key size, 16 bits each: 131,086 bytes), plus the page itself."""

_MAPS = "/proc/self/maps"
_MAP_FIXED = 0x10  # Linux (every architecture); Python's mmap module does not export it


def map_size_for(file_size: int) -> int:
    """The map size to open a ``file_size``-byte ``data.mdb`` with: the file, then :data:`REACH`."""
    return -(-file_size // mmap.PAGESIZE) * mmap.PAGESIZE + REACH


Mapping = tuple[int, int, int, int]  # start, end, file offset, inode


# A mapping of a file from its start: "START-END PERMS 00000000 DEV INODE" (offset 0, inode not 0).
_FILE_START = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) \S+ 0+ \S+ ([1-9][0-9]*)", re.MULTILINE)


def mappings(inode: int | None = None) -> set[Mapping] | None:
    """The mappings of files from their first byte in this process (None where
    ``/proc/self/maps`` does not exist), or only those of the file ``inode``; a process using
    PyTorch (or reading a shard set of thousands of databases) has thousands of mappings, so the
    listing is scanned by one regular expression, not line by line."""
    if sys.platform != "linux" or not os.path.exists(_MAPS):
        return None
    with open(_MAPS, "rb") as maps:
        listing = maps.read()
    if inode is None:
        found = _FILE_START.findall(listing)
    else:  # only this file's lines: the pattern fails fast on every other one
        found = re.findall(rb"^([0-9a-f]+)-([0-9a-f]+) \S+ 0+ \S+ (%d)\b" % inode, listing, re.MULTILINE)
    return {(int(start, 16), int(end, 16), 0, int(number)) for start, end, number in found}


def locate(
    env: lmdb.Environment,
    before: set[Mapping] | None,
    inode: int,
    file_size: int,
    *,
    after: set[Mapping] | None = None,
) -> LmdbMap | None:
    """LMDB's map of the file ``env`` has open: the new mapping since ``before`` (see the module
    docstring), its part past the file replaced by zero pages; None if it cannot be told.
    ``after``: the mappings now, if the caller has read them (for many files at once)."""
    after = mappings(inode) if after is None else after
    if before is None or after is None:
        return None
    length = -(-int(env.info()["map_size"]) // mmap.PAGESIZE) * mmap.PAGESIZE
    new = [m for m in after - before if m[1] - m[0] == length and m[2] == 0 and m[3] == inode]
    if len(new) != 1:
        return None
    base = new[0][0]
    file_end = -(-file_size // mmap.PAGESIZE) * mmap.PAGESIZE  # the last partial page reads zeros past EOF
    if length - file_end < REACH or not _zero_pages(base + file_end, length - file_end):
        return None
    return LmdbMap(base, file_size)


def _zero_pages(address: int, length: int) -> bool:
    """Replace ``length`` bytes of mapping at ``address`` by anonymous read-only zero pages."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
    return libc.mmap(address, length, mmap.PROT_READ, flags, -1, 0) == address


def numpy_address(view: memoryview) -> int:
    """The address of ``view``'s first byte as NumPy tells it (about 1.5 µs: a ctypes object)."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def _find_buffer_field() -> int | None:
    """Where CPython keeps a memoryview's buffer pointer inside the object, if we can tell.

    Asking NumPy for the address of each value costs ~1.5 µs (a ctypes object per call), more
    than the rest of a read. CPython stores the ``Py_buffer`` inline in the memoryview, so its
    ``buf`` pointer is a word at a fixed offset: found here by matching NumPy's answer on
    several buffers, and used only when exactly one offset matches them all (else None: NumPy
    is asked). Reading that word never leaves the object.
    """
    if sys.implementation.name != "cpython":
        return None
    buffers = [bytes(range(n % 256)) * 3 + b"x" for n in (5, 77, 200)]
    views = [memoryview(b)[i:] for i, b in enumerate(buffers)]
    size = sys.getsizeof(views[0])
    word = ctypes.sizeof(ctypes.c_void_p)
    found = [
        offset
        for offset in range(0, size - word + 1, word)
        if all(ctypes.c_void_p.from_address(id(v) + offset).value == numpy_address(v) for v in views)
    ]
    return found[0] if len(found) == 1 else None


BUFFER_FIELD = _find_buffer_field()
_FROM_ADDRESS = ctypes.c_void_p.from_address


def buffer_address(view: memoryview) -> int:
    """The address of the first byte of ``view`` (without touching it)."""
    if BUFFER_FIELD is not None:
        return _FROM_ADDRESS(id(view) + BUFFER_FIELD).value or 0
    return numpy_address(view) if len(view) else 0


class LmdbMap:
    """``[base, base + size)``: LMDB's map of one file, and the file's size."""

    __slots__ = ("base", "size")

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size

    def offset(self, view: memoryview) -> int | None:
        """The file offset of ``view`` if all of it lies inside the file, else None."""
        offset = buffer_address(view) - self.base
        return offset if offset >= 0 and offset + len(view) <= self.size else None

    def copy(self, view: memoryview, folder: Path, key: bytes, what: str = "value") -> bytes:
        """``bytes(view)`` if all of it lies inside the file; a DatumError naming the file and key if not."""
        offset = buffer_address(view) - self.base
        if offset < 0 or offset + len(view) > self.size:
            raise DatumError(
                f"{folder / 'data.mdb'}: damaged: LMDB places this record's {what} ({len(view)} bytes at offset "
                f"{offset}) outside the {self.size}-byte file",
                key,
            )
        return bytes(view)
