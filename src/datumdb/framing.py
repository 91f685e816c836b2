"""Records laid out as the content digest hashes them, built and hashed in bulk.

The content digest (:class:`datumdb.manifest.ContentDigest`) hashes every record as
``RECORD_FRAME + key + value``. Laying a whole chunk of records out that way, back to back in
one buffer, serves two purposes at once: LMDB gets each key and value as a view into it (no
copy per record), and the digest hashes a run of records in one call, which releases the GIL,
so it can go on in a worker thread (:class:`BackgroundDigest`) while LMDB writes or records
are checked. Per record, Python then only makes two views; everything else is NumPy over the
whole chunk. Building the buffer:

* :func:`frame_raw_images` for the common case of a build, a chunk of uniform uint8 images with
  index keys: the raw Datums assembled by one NumPy copy (header, payload, label tail), byte for
  byte what :func:`datumdb.codec.encode_array` gives each one (the tests compare them);
* :func:`frame_items` for (key, value) pairs read back (verify): one ``join``.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from datumdb.codec import RawLayout
from datumdb.manifest import RECORD_FRAME, ContentDigest

__all__ = ["BackgroundDigest", "FramedRecords", "frame_items", "frame_raw_images", "index_key_digits"]

_FRAME_DTYPE = np.dtype([("key", "<u4"), ("value", "<u8")])  # RECORD_FRAME ("<IQ") as a NumPy record


@dataclass(frozen=True)
class FramedRecords:
    """Records ``RECORD_FRAME + key + value`` back to back in ``buffer`` (one-dimensional uint8).

    Record ``i`` spans ``buffer[bounds[i]:bounds[i + 1]]``; its key is the ``key_lengths[i]``
    bytes after the frame and its value the rest.
    """

    buffer: np.ndarray
    bounds: np.ndarray
    key_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def value_starts(self) -> np.ndarray:
        return self.bounds[:-1] + RECORD_FRAME.size + self.key_lengths

    @property
    def value_ends(self) -> np.ndarray:
        return self.bounds[1:]

    def items(self) -> list[tuple[bytes | memoryview, memoryview]]:
        """``(key, value)`` pairs for ``putmulti``: values are views into the buffer (no copy);
        keys of one length are gathered by one NumPy index into small bytes (cheaper than views)."""
        view = memoryview(self.buffer)
        key_starts = self.bounds[:-1] + RECORD_FRAME.size
        value_starts = self.value_starts.tolist()
        keys: Iterable[bytes | memoryview]
        if len(self) and self.key_lengths.min() == self.key_lengths.max():
            width = int(self.key_lengths[0])
            gathered = self.buffer[key_starts[:, np.newaxis] + np.arange(width)]
            keys = gathered.view(_void(width)).ravel().tolist()  # bytes, NULs kept
        else:
            keys = map(view.__getitem__, map(slice, key_starts.tolist(), value_starts))
        values = map(view.__getitem__, map(slice, value_starts, self.bounds[1:].tolist()))
        return list(zip(keys, values, strict=True))


@functools.lru_cache(maxsize=64)
def _void(width: int) -> np.dtype:
    """The ``V<width>`` dtype, made once: building it calls a Python helper from NumPy's C code,
    which drops any exception raised inside it, a KeyboardInterrupt from a signal included."""
    return np.dtype((np.void, width))


def index_key_digits(first: int, count: int, width: int) -> np.ndarray:
    """The index keys ``b"%0*d" % (width, i)`` of records ``first .. first+count-1``, as a
    (count, width) uint8 array of ASCII digits; every index must have at most ``width`` digits."""
    indices = np.arange(first, first + count, dtype=np.int64)
    digits = np.full((count, width), ord("0"), dtype=np.uint8)
    last = first + count - 1
    for column in range(width):
        power = 10 ** (width - 1 - column)
        if power <= last:  # higher columns are all "0" (and 10**19 would overflow int64)
            digits[:, column] += (indices // power % 10).astype(np.uint8)
    return digits


def frame_raw_images(images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> FramedRecords:
    """Frame ``images`` (N, C, H, W) uint8 as raw Datums with int32 ``labels`` under ``keys``.

    ``keys`` is an (N, K) uint8 array (one K-byte key per row, e.g. :func:`index_key_digits`).
    The value of each record is ``header + payload + tail(label)``, exactly
    :func:`datumdb.codec.encode_array`'s bytes; tails differ in length with the label's varint
    (1 byte for 0..127, 10 for negatives), so records of other lengths than the longest are
    packed together by one ``join`` (a per-record slice, no per-record encoding).
    """
    count, key_length = keys.shape
    layout = RawLayout(images.shape[1:])  # type: ignore[arg-type]
    unique, inverse = np.unique(labels, return_inverse=True)
    tails = [RawLayout.tail(int(label)) for label in unique.tolist()]
    tail_lengths = np.array([len(tail) for tail in tails], dtype=np.int64)
    widest = int(tail_lengths.max())
    tail_table = np.zeros((len(tails), widest), dtype=np.uint8)
    for row, tail in enumerate(tails):
        tail_table[row, : len(tail)] = np.frombuffer(tail, dtype=np.uint8)

    header = np.frombuffer(layout.header, dtype=np.uint8)
    key_start = RECORD_FRAME.size
    value_start = key_start + key_length
    payload_start = value_start + len(header)
    tail_start = payload_start + layout.size
    stride = tail_start + widest
    value_lengths = layout.tail_start + tail_lengths[inverse]

    rows = np.empty((count, stride), dtype=np.uint8)
    frames = np.empty(count, dtype=_FRAME_DTYPE)
    frames["key"] = key_length
    frames["value"] = value_lengths
    rows[:, :key_start] = frames.view(np.uint8).reshape(count, key_start)
    rows[:, key_start:value_start] = keys
    rows[:, value_start:payload_start] = header
    payloads = np.reshape(rows[:, payload_start:tail_start], images.shape, copy=False)  # a view, or an error
    payloads[...] = images  # the one big copy, whatever the strides of ``images`` (HWC, flipped channels)
    rows[:, tail_start:] = tail_table[inverse]

    record_lengths = value_start + value_lengths
    bounds = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(record_lengths, out=bounds[1:])
    if (tail_lengths == widest).all():
        buffer = rows.reshape(-1)
    else:  # drop each short record's padding: one copy by join, a slice per record
        view = memoryview(rows.reshape(-1))
        starts = range(0, count * stride, stride)
        ends = (np.arange(count, dtype=np.int64) * stride + record_lengths).tolist()
        buffer = np.frombuffer(b"".join(map(view.__getitem__, map(slice, starts, ends))), dtype=np.uint8)
    return FramedRecords(buffer, bounds, np.full(count, key_length, dtype=np.int64))


def frame_items(keys: list[bytes], values: list[bytes]) -> FramedRecords:
    """Frame (key, value) pairs read back from a database: one copy, by ``join``."""
    key_lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
    value_lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    frames: Iterator[bytes]
    if len(keys) and key_lengths.min() == key_lengths.max() and value_lengths.min() == value_lengths.max():
        frames = itertools.repeat(RECORD_FRAME.pack(int(key_lengths[0]), int(value_lengths[0])), len(keys))
    else:
        frames = map(RECORD_FRAME.pack, key_lengths.tolist(), value_lengths.tolist())
    joined = b"".join(itertools.chain.from_iterable(zip(frames, keys, values, strict=True)))
    bounds = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(key_lengths + value_lengths + RECORD_FRAME.size, out=bounds[1:])
    return FramedRecords(np.frombuffer(joined, dtype=np.uint8), bounds, key_lengths)


class BackgroundDigest:
    """Feed a :class:`ContentDigest` with framed records from one worker thread, in order.

    :meth:`submit` returns at once; the digest is hashed meanwhile (hashlib releases the GIL),
    so it costs the caller almost nothing while it writes or checks the next chunk. At most
    ``max_pending`` chunks wait (their buffers are kept alive until hashed), which bounds
    memory. Read ``digest`` only after :meth:`wait`; :meth:`close` always, when done.
    """

    def __init__(self, digest: ContentDigest, *, max_pending: int = 1) -> None:
        self.digest = digest
        self.max_pending = max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[None]] = deque()

    def __bool__(self) -> bool:
        """Whether chunks are still being hashed (the digest must not be touched meanwhile)."""
        return bool(self._pending)

    def submit(self, records: FramedRecords) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="datumdb-digest")
        self._pending.append(self._pool.submit(self.digest.update_framed, records.buffer, records.bounds))
        while len(self._pending) > self.max_pending:
            self._pending.popleft().result()

    def wait(self) -> ContentDigest:
        """Wait until every submitted chunk is in the digest; the digest."""
        while self._pending:
            self._pending.popleft().result()
        return self.digest

    def close(self) -> None:
        """Stop the worker (chunks not yet hashed are dropped: call :meth:`wait` first to keep them)."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
