"""Fast reads of uniform raw databases: a fixed-layout decoder and an offset-index gather.

Almost every training database is uniform: every value is a raw uint8 Datum of one shape, so
every value is ``header + payload + label tail`` with the same header. Two shortcuts follow,
and both fall back to the general path (:func:`datumdb.codec.decode`) for anything else:

* :class:`datumdb.codec.RawLayout` checks a value against the expected header and tail with two
  byte comparisons and slices the payload, instead of parsing field by field.
* :class:`OffsetIndex` records, once per process, where each value's payload sits in
  ``data.mdb`` (from the address LMDB returns for it and the page number in the header of the
  page holding it), validates a sample of them against the file, and then gathers a batch with
  one NumPy fancy index over an overlapping strided view of a read-only map of the file: the same
  operation as a memmap gather of a ``.npy``. The map is handed in by the caller, made from the
  very file the LMDB environment has open (:mod:`datumdb.reader` maps the descriptor it pinned),
  never by opening ``data.mdb`` by path: after a rebuild the path names another file, and the
  sample check could not see that one record differs.
"""

from __future__ import annotations

import ctypes
import mmap
import random

import lmdb
import numpy as np

from datumdb.codec import RawLayout

__all__ = ["OffsetIndex"]

_VALIDATED_SAMPLE = 64

Buffer = bytes | memoryview | mmap.mmap  # anything NumPy can view as bytes without a copy


class OffsetIndex:
    """Payload offsets in ``data.mdb`` of every record (in key order), and their labels."""

    def __init__(self, offsets: np.ndarray, labels: np.ndarray, layout: RawLayout, data: Buffer) -> None:
        self.offsets = offsets
        self.labels = labels
        self.layout = layout
        self._file = np.frombuffer(data, dtype=np.uint8)  # keeps ``data`` (the map) alive
        # Element r is the payload-sized byte string starting at byte r (a void scalar, copied
        # with one memcpy): a gather is one fancy index over this view, as for a .npy memmap.
        self._record = np.dtype((np.void, layout.size))
        rows = len(self._file) - layout.size + 1
        self._rows = np.ndarray((rows,), dtype=self._record, buffer=self._file, offset=0, strides=(1,))

    @classmethod
    def build(cls, env: lmdb.Environment, data: Buffer, layout: RawLayout) -> OffsetIndex | None:
        """Scan once with buffers; None unless every record has ``layout`` and the offsets check out.

        ``data`` is a read-only map (e.g. :class:`mmap.mmap`) of the whole file ``env`` has open:
        the same file, not merely the same path, or the index gathers another version's pixels.
        """
        file_size = len(data)
        with env.begin(buffers=True) as txn:  # values as views of the map: their addresses are what we want
            page_size = int(txn.stat()["psize"])
            addresses, labels = [], []
            base = None
            for _, value in txn.cursor().iternext(keys=True, values=True):
                label = layout.label(value)
                if label is None:
                    return None
                address = np.frombuffer(value, dtype=np.uint8).ctypes.data
                if base is None:  # the map's start, from the page number in this page's header
                    page_start = address - address % page_size
                    base = page_start - ctypes.c_uint64.from_address(page_start).value * page_size
                addresses.append(address - base)
                labels.append(label)
            if base is None or min(addresses) < 0 or max(addresses) + layout.tail_start > file_size:
                return None
            offsets = np.asarray(addresses, dtype=np.int64) + len(layout.header)
            index = cls(offsets, np.asarray(labels, dtype=np.int64), layout, data)
            return index if index._agrees_with(txn) else None

    def _agrees_with(self, txn: lmdb.Transaction) -> bool:
        """Compare a sample of gathered payloads (first, last, random) with what LMDB returns."""
        count = len(self.offsets)
        sample = sorted({0, count - 1, *random.Random(count).sample(range(count), min(count, _VALIDATED_SAMPLE))})
        position = 0
        with txn.cursor() as cursor:
            for index, (_, value) in enumerate(cursor.iternext(keys=True, values=True)):
                if position < len(sample) and index == sample[position]:
                    if self._rows[self.offsets[index]].tobytes() != self.layout.array(value).tobytes():
                        return False
                    position += 1
        return position == len(sample)

    def gather(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
        # Advanced indexing walks the overlapping view as is (np.take would first copy all of it
        # into a contiguous array: hundreds of gigabytes).
        out.reshape(len(indices), -1).view(self._record).reshape(len(indices))[...] = self._rows[self.offsets[indices]]
        return self.labels[indices]
