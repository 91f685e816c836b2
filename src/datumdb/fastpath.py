"""Fast reads of uniform raw databases: a fixed-layout decoder and an offset index.

Almost every training database is uniform: every value is a raw uint8 Datum of one shape, so
every value is ``header + payload + label tail`` with the same header. Two shortcuts follow,
and both fall back to the general path (:func:`datumdb.codec.decode`) for anything else:

* :class:`datumdb.codec.RawLayout` checks a value against the expected header and tail with two
  byte comparisons and slices the payload, instead of parsing field by field.
* :class:`OffsetIndex` records, once per process, where each value's payload sits in
  ``data.mdb`` (the address LMDB returns for it, less the base of LMDB's map as the kernel
  reports it: :mod:`datumdb.lmdbmap`), checks every record's header and label tail in the file,
  compares a sample of payloads with what LMDB returns, and then reads through an overlapping strided view of a
  read-only map of the file: a batch is one NumPy fancy index and a single record one integer
  index, the same operations as on a ``.npy`` memmap. The map is handed in by the caller, made
  from the very file the LMDB environment has open (:mod:`datumdb.reader` maps the descriptor it
  pinned), never by opening ``data.mdb`` by path: after a rebuild the path names another file,
  and the sample check could not see that one record differs.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import random

import lmdb
import numpy as np

from datumdb.codec import RawLayout
from datumdb.lmdbmap import BUFFER_FIELD, LmdbMap, numpy_address

__all__ = ["OffsetIndex"]

_BUFFER_FIELD = BUFFER_FIELD  # where a memoryview keeps its address (None: ask NumPy)

_VALIDATED_SAMPLE = 64  # payloads compared byte for byte with LMDB's own answer
_CHECK_CHUNK = 1 << 16  # records whose headers and tails are checked in one vectorised step

Buffer = bytes | memoryview | mmap.mmap  # anything NumPy can view as bytes without a copy


class OffsetIndex:
    """Payload offsets in ``data.mdb`` of every record (in key order), and their labels.

    ``offsets`` and ``labels`` are int64 arrays for batch gathers; ``record_offsets`` and
    ``record_labels`` are the same memory as :class:`array.array`, whose items are Python ints
    without a NumPy scalar in between (a single read is two such lookups and one view).
    """

    def __init__(self, offsets: array.array, labels: array.array, layout: RawLayout, data: Buffer) -> None:
        self.record_offsets = offsets
        self.record_labels = labels
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.labels = np.frombuffer(labels, dtype=np.int64)
        self.layout = layout
        self._file = np.frombuffer(data, dtype=np.uint8)  # keeps ``data`` (the map) alive
        rows = len(self._file) - layout.size + 1
        # Element r is the payload-sized byte string starting at byte r (a void scalar, copied
        # with one memcpy): a gather is one fancy index over this view, as for a .npy memmap.
        self._record = np.dtype((np.void, layout.size))
        self._rows = np.ndarray((rows,), dtype=self._record, buffer=self._file, offset=0, strides=(1,))
        # Element r is the (C, H, W) image starting at byte r: a single read is one integer index.
        _channels, height, width = layout.shape
        self.images = np.lib.stride_tricks.as_strided(
            self._file, (rows, *layout.shape), (1, height * width, width, 1), writeable=False
        )

    @classmethod
    def build(
        cls, env: lmdb.Environment, lmdb_map: LmdbMap, data: Buffer, layout: RawLayout, count: int
    ) -> OffsetIndex | None:
        """Scan once; None unless the ``count`` records all have ``layout`` and the offsets check out.

        ``data`` is a read-only map (e.g. :class:`mmap.mmap`) of the whole file ``env`` has open:
        the same file, not merely the same path, or the index reads another version's pixels.
        ``lmdb_map`` is where LMDB mapped that file (from the kernel, never from bytes in the
        file: see :mod:`datumdb.lmdbmap`), so a value's file offset is its address minus the
        map's base, and the index serves exactly the bytes LMDB serves. The scan only asks LMDB
        where each value is (its pages are not read); every value must lie inside the file, and
        the headers and label tails are then checked in the file, a chunk of records at a time.
        ``count`` is the number of records the caller found in key order (the scan stops there).
        """
        file = np.frombuffer(data, dtype=np.uint8)
        if count == 0 or len(file) != lmdb_map.size:
            return None
        try:
            return cls._build(env, lmdb_map, data, file, layout, count)
        except lmdb.Error:  # the caller's own walk found these records: the general path says what is wrong
            return None

    @classmethod
    def _build(
        cls, env: lmdb.Environment, lmdb_map: LmdbMap, data: Buffer, file: np.ndarray, layout: RawLayout, count: int
    ) -> OffsetIndex | None:
        field = _BUFFER_FIELD
        with env.begin(buffers=True) as txn:  # values as views of the map: their addresses are what we want
            picked = set(random.Random(count).sample(range(count), min(count, _VALIDATED_SAMPLE))) | {0, count - 1}
            addresses, lengths, views = array.array("q"), array.array("q"), {}
            from_address = ctypes.c_void_p.from_address
            for position, value in enumerate(txn.cursor().iternext(keys=False, values=True)):
                if position == count:
                    return None  # more records than the caller found: not the same B-tree walk
                addresses.append(from_address(id(value) + field).value if field is not None else numpy_address(value))
                lengths.append(len(value))
                if position in picked:
                    views[position] = value
            if len(addresses) != count:
                return None
            starts = np.frombuffer(addresses, dtype=np.int64) - lmdb_map.base
            ends = starts + np.frombuffer(lengths, dtype=np.int64)
            if starts.min() < 0 or ends.max() > len(file):
                return None  # a value outside the file: the general path names it
            sample = {position: bytes(view) for position, view in views.items()}  # inside the file: checked
        labels = _checked_labels(file, starts, ends, layout)
        if labels is None:
            return None
        offsets = array.array("q")
        offsets.frombytes((starts + len(layout.header)).tobytes())
        index = cls(offsets, labels, layout, data)
        return index if index._agrees_with(sample) else None

    def _agrees_with(self, sample: dict[int, bytes]) -> bool:
        """Compare a sample of values (first, last, random) as read through the index and by LMDB."""
        for position, value in sample.items():
            image, label = self.record(position)
            if label != self.layout.label(value) or image.tobytes() != self.layout.array(value).tobytes():
                return False
        return True

    def record(self, position: int) -> tuple[np.ndarray, int]:
        """The (C, H, W) read-only view of one record's payload in the map, and its label."""
        return self.images[self.record_offsets[position]], self.record_labels[position]

    def payloads(self, start: int, stop: int) -> np.ndarray:
        """A copy of the payloads of records ``start`` to ``stop`` (exclusive), one row each."""
        rows = self._rows[self.offsets[start:stop]]
        return rows.view(np.uint8).reshape(len(rows), self.layout.size)

    def gather(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
        # Advanced indexing walks the overlapping view as is (np.take would first copy all of it
        # into a contiguous array: hundreds of gigabytes).
        out.reshape(len(indices), -1).view(self._record).reshape(len(indices))[...] = self._rows[self.offsets[indices]]
        return self.labels[indices]


def _checked_labels(file: np.ndarray, starts: np.ndarray, ends: np.ndarray, layout: RawLayout) -> array.array | None:
    """Every record's label if each value in ``file[start:end]`` has ``layout``, else None.

    :meth:`RawLayout.labels` (the test of :meth:`RawLayout.label`, vectorised for labels of any
    length) a chunk of records at a time, into an :class:`array.array` of int64.
    """
    labels = array.array("q", bytes(8 * len(starts)))
    out = np.frombuffer(labels, dtype=np.int64)
    for begin in range(0, len(starts), _CHECK_CHUNK):
        found = layout.labels(file, starts[begin : begin + _CHECK_CHUNK], ends[begin : begin + _CHECK_CHUNK])
        if found is None:
            return None
        out[begin : begin + len(found)] = found
    return labels
