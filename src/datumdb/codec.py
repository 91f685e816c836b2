"""Caffe ``Datum`` codec: exact bytes out, zero-copy views in, clear errors on bad input.

Why not just ``datum_pb2.Datum``? Three reasons, each measured or required:

* **Exactness.** Caffe writes ``label`` and ``encoded=false`` explicitly and omits the shape
  fields of encoded Datums. We serialize by hand so the bytes are Caffe's by construction
  (fields 1,2,3,4,5,(6),7 in that order); the test suite checks every encoder path against the
  generated protobuf classes and against the real Caffe fixtures.
* **Zero copies on read.** ``protobuf`` copies the ``data`` field into a new ``bytes``; the
  hand parser returns a ``memoryview`` of the value, so a raw image becomes a numpy view.
* **Hostile input.** Every length is checked against the bytes actually present before it is
  used, so a forged size field can never trigger a large allocation, and every problem raises
  :class:`~datumdb.errors.DatumError` naming the key. Parsing a value takes at most
  :data:`DECODE_MEMORY_FACTOR` (3) times its size plus :data:`DECODE_MEMORY_SLACK` (8 MiB),
  whatever its fields (see :func:`decode`). Decoding an encoded image takes what its header
  declares, and that is bounded before the decoder runs (:mod:`datumdb.imageheader`: accepted
  formats only, pixels, bytes to decode, JPEG scans); every OpenCV call goes through
  :func:`imdecode`, :func:`imencode` or :func:`resize`, so no ``cv2.error`` escapes: a header
  over a bound is a DatumError too.

The generated classes (``datumdb.proto.datum_pb2``) remain the reference implementation and are
used for ``BlobProto`` (mean files), where speed does not matter.
"""

from __future__ import annotations

import functools
import os
from array import array as typed_array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from datumdb import imageheader, limits, pnggray
from datumdb.errors import DatumError

# Before cv2 is imported: OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, at import. The bound
# (limits.MAX_IMAGE_PIXELS, about 134 megapixels, unless the user set it) admits real photos and
# stops a forged PNG/JPEG header from making imdecode allocate gigabytes.
limits.configure_opencv()
import cv2  # noqa: E402

__all__ = [
    "Datum",
    "ImreadMode",
    "RawLayout",
    "check_label",
    "datum_to_array",
    "decode",
    "decode_image",
    "encode_array",
    "encode_image",
    "encode_image_into",
    "encode_png_or_jpg",
    "encode_sample",
    "hwc_to_chw",
    "imdecode",
    "imencode",
    "nhwc_to_nchw",
    "resize",
    "shape_name",
]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

ImreadMode = Literal["unchanged", "color", "gray"]
_IMREAD_FLAGS: dict[str, int] = {
    "unchanged": cv2.IMREAD_UNCHANGED,  # what Caffe's DecodeDatumNative does
    "color": cv2.IMREAD_COLOR,
    "gray": cv2.IMREAD_GRAYSCALE,
}

# Tags: (field number << 3) | wire type.
_TAG_CHANNELS = 0x08
_TAG_HEIGHT = 0x10
_TAG_WIDTH = 0x18
_TAG_DATA = 0x22
_TAG_LABEL = 0x28
_TAG_FLOAT = 0x35  # field 6, fixed32 (Caffe's float_data is not packed)
_TAG_ENCODED = 0x38
_MAX_VARINT = 10  # bytes of the longest varint (a negative int32 takes all ten)

_EMPTY_FLOATS = np.empty(0, dtype="<f4")
_EMPTY_FLOATS.flags.writeable = False


@dataclass(frozen=True, slots=True)
class Datum:
    """A parsed Datum. ``data`` is a zero-copy view into the serialized value."""

    channels: int = 0
    height: int = 0
    width: int = 0
    data: memoryview | bytes = b""
    label: int = 0
    float_data: np.ndarray = field(default_factory=lambda: _EMPTY_FLOATS)
    encoded: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        """The declared (channels, height, width); all zero for Caffe-made encoded Datums."""
        return (self.channels, self.height, self.width)


# --------------------------------------------------------------------------- encoding


def _varint(value: int) -> bytes:
    """Protobuf varint of an int32/int64/bool field; negatives take ten bytes, as in protobuf."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def check_label(label: object, key: bytes | str | None = None) -> int:
    """Return ``label`` as a Python int, or raise DatumError unless it is an int32 integer."""
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise DatumError(f"label must be an integer, got {label!r}", key)
    value = int(label)
    if not INT32_MIN <= value <= INT32_MAX:
        raise DatumError(f"label {value} is outside the int32 range of Caffe's Datum", key)
    return value


def _check_dim(name: str, value: int, key: bytes | str | None) -> int:
    if not 0 <= value <= INT32_MAX:
        raise DatumError(f"{name}={value} does not fit Caffe's int32 field", key)
    return value


def _shape_fields(shape: tuple[int, int, int], key: bytes | str | None) -> bytes:
    channels, height, width = (
        _check_dim(n, int(v), key) for n, v in zip(("channels", "height", "width"), shape, strict=True)
    )
    return (
        bytes([_TAG_CHANNELS])
        + _varint(channels)
        + bytes([_TAG_HEIGHT])
        + _varint(height)
        + bytes([_TAG_WIDTH])
        + _varint(width)
    )


def _tail(label: int, encoded: bool) -> bytes:
    return bytes([_TAG_LABEL]) + _varint(label) + bytes([_TAG_ENCODED, 1 if encoded else 0])


@functools.lru_cache(maxsize=64)
def _raw_header(shape: tuple[int, int, int]) -> bytes:
    """Fields 1-4 up to the payload of a raw Datum: the same for every image of one shape."""
    return _shape_fields(shape, None) + bytes([_TAG_DATA]) + _varint(shape[0] * shape[1] * shape[2])


@functools.lru_cache(maxsize=4096)
def _raw_tail(label: int) -> bytes:
    return _tail(label, False)


def as_chw(array: np.ndarray, key: bytes | str | None = None) -> np.ndarray:
    """View a (H, W) or (C, H, W) array as (C, H, W); reject anything else."""
    if array.ndim == 2:
        return array[np.newaxis]
    if array.ndim == 3:
        return array
    raise DatumError(f"an image array must be (H, W) or (C, H, W), got shape {array.shape}", key)


def encode_array(array: np.ndarray, label: int = 0, *, key: bytes | str | None = None) -> bytes:
    """Serialize a (C, H, W) or (H, W) array as a raw Datum, byte for byte as Caffe would.

    ``uint8`` goes into ``data`` (Caffe's ``CVMatToDatum``: fields 1,2,3,4,5,7 with ``label`` and
    ``encoded=false`` explicit). Any other real numeric dtype is converted to float32 and goes
    into ``float_data`` (unpacked, as caffe.proto declares it); non-finite values are rejected
    because no training pipeline wants them and they are almost always a bug upstream.
    """
    array = as_chw(np.asarray(array), key)
    if array.size == 0:
        raise DatumError(f"image of shape {array.shape} has no pixels", key)
    label = check_label(label, key)
    if array.dtype == np.uint8:
        # One join, one copy: ``header + payload + tail`` makes two payload-sized temporaries,
        # which for a photo-sized record (over glibc's mmap threshold) cost 70x the copy itself.
        return b"".join((_raw_header(array.shape), np.ascontiguousarray(array).data, _raw_tail(label)))
    head = _shape_fields(array.shape, key)
    if array.dtype.kind not in "iuf" or array.dtype == np.bool_:
        raise DatumError(f"cannot store dtype {array.dtype} in a Datum (use uint8 or a real number type)", key)
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: rejected below
        floats = np.ascontiguousarray(array, dtype="<f4").reshape(-1)
    if not np.isfinite(floats).all():
        raise DatumError("float data contains NaN or infinity (or values beyond float32)", key)
    wire = np.empty((floats.size, 5), dtype=np.uint8)
    wire[:, 0] = _TAG_FLOAT
    wire[:, 1:] = floats.view(np.uint8).reshape(-1, 4)
    return b"".join((head, bytes([_TAG_LABEL]), _varint(label), wire.data, bytes([_TAG_ENCODED, 0])))


def encode_opencv_image(image: np.ndarray, label: int = 0, *, key: bytes | str | None = None) -> bytes:
    """An OpenCV (H, W) or (H, W, C) uint8 image as a raw Datum: ``encode_array(hwc_to_chw(image))``.

    The same bytes, made faster for what convert-imageset does once per photo: the record is
    allocated once and OpenCV's ``split`` writes each colour plane straight into its payload
    (a tenth of the time of NumPy's transposing copy, and no payload-sized temporaries).
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        return encode_array(hwc_to_chw(image), label, key=key)
    record = bytearray(opencv_image_record_bytes(image, label))
    encode_opencv_image_into(image, label, memoryview(record), key=key)
    return bytes(record)


def opencv_image_record_bytes(image: np.ndarray, label: int) -> int:
    """The length of :func:`encode_opencv_image`'s record of a uint8 ``image`` (nothing encoded)."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    return len(_raw_header((channels, *image.shape[:2]))) + image.size + len(_raw_tail(label))


def encode_opencv_image_into(
    image: np.ndarray, label: int, out: memoryview, *, key: bytes | str | None = None
) -> int | None:
    """Write :func:`encode_opencv_image`'s record of a non-empty uint8 ``image`` at the start of ``out``.

    What lets convert-imageset's workers make each record in shared memory, where the writer
    reads it, instead of in a private buffer that is then pickled through a pipe and copied
    twice more. Returns the record's length, or None (nothing written) if ``out`` is too short.
    """
    label = check_label(label, key)
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    head, tail = _raw_header((channels, height, width)), _raw_tail(label)
    length = len(head) + image.size + len(tail)
    if length > len(out):
        return None
    out[: len(head)] = head
    out[length - len(tail) : length] = tail
    planes = np.frombuffer(out, np.uint8, image.size, len(head)).reshape(channels, height, width)
    if channels == 1:
        planes[0] = image.reshape(height, width)
    else:
        cv2.split(np.ascontiguousarray(image), list(planes))
    return length


def encode_image(
    image: bytes,
    label: int = 0,
    *,
    shape: tuple[int, int, int] | None = None,
    key: bytes | str | None = None,
) -> bytes:
    """Serialize already-encoded image bytes (PNG, JPEG...) as an ``encoded=true`` Datum.

    Caffe's ``convert_imageset --encoded`` leaves channels/height/width unset (``shape=None``
    reproduces it exactly); pass ``shape=(C, H, W)`` to record the decoded shape as well, which
    readers can then use without decoding.
    """
    head, tail = _encoded_parts(image, label, shape, key)
    return b"".join((head, image, tail))  # one copy


def encode_image_into(image: bytes, label: int, out: memoryview, *, key: bytes | str | None = None) -> int | None:
    """Write :func:`encode_image`'s record (shape unset, as Caffe's) at the start of ``out``.

    The shared-memory twin of :func:`encode_image` (see :func:`encode_opencv_image_into`): the
    record's length, or None (nothing written) if ``out`` is too short.
    """
    head, tail = _encoded_parts(image, label, None, key)
    length = len(head) + len(image) + len(tail)
    if length > len(out):
        return None
    out[: len(head)] = head
    out[len(head) : length - len(tail)] = image
    out[length - len(tail) : length] = tail
    return length


def _encoded_parts(
    image: bytes, label: int, shape: tuple[int, int, int] | None, key: bytes | str | None
) -> tuple[bytes, bytes]:
    """What comes before and after the image bytes in an encoded Datum."""
    label = check_label(label, key)
    if not image:
        raise DatumError("an encoded Datum needs non-empty image bytes", key)
    head = _shape_fields(shape, key) if shape is not None else b""
    return head + bytes([_TAG_DATA]) + _varint(len(image)), _tail(label, True)


def encode_png_or_jpg(chw: np.ndarray, encoding: Literal["png", "jpg"], key: bytes | str | None = None) -> bytes:
    """Encode a (C, H, W) uint8 array (C = 1 or 3, BGR) as PNG or JPEG with OpenCV's defaults.

    JPEG uses OpenCV's default quality 95, as Caffe's ``cv::imencode`` call does.
    """
    chw = as_chw(chw, key)
    if chw.dtype != np.uint8 or chw.shape[0] not in (1, 3):
        raise DatumError(
            f"only 1- or 3-channel uint8 images can be {encoding}-encoded, got {chw.dtype} {chw.shape}", key
        )
    hwc = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
    return imencode("." + encoding, np.ascontiguousarray(hwc), key)


def encode_sample(
    array: np.ndarray, label: int, encoding: Literal["none", "png", "jpg"], key: bytes | str | None = None
) -> bytes:
    """The Datum of one sample, as every datumdb writer stores it (the writer and the pipeline).

    ``none``: a raw Datum (:func:`encode_array`); ``png``/``jpg``: the image encoded with
    OpenCV's defaults, in an encoded Datum that also records the decoded (C, H, W).
    """
    if encoding == "none":
        return encode_array(array, label, key=key)
    chw = as_chw(np.asarray(array), key)
    return encode_image(encode_png_or_jpg(chw, encoding, key), label, shape=chw.shape, key=key)


def hwc_to_chw(image: np.ndarray) -> np.ndarray:
    """OpenCV's (H, W) or (H, W, C) image as a Datum's (C, H, W) view (no copy)."""
    return image[np.newaxis] if image.ndim == 2 else image.transpose(2, 0, 1)


def nhwc_to_nchw(images: np.ndarray) -> np.ndarray:
    """:func:`hwc_to_chw` of every image of an (N, H, W, C) array: an (N, C, H, W) view."""
    return images.transpose(0, 3, 1, 2)


def shape_name(shape: Sequence[int] | None) -> str:
    """How manifests and reports name a shape: ``"3x32x32"`` (``"unknown"`` when not recorded)."""
    return "x".join(map(str, shape)) if shape else "unknown"


# --------------------------------------------------------------------------- decoding


def _read_varint(buf: memoryview, pos: int, end: int, key: bytes | str | None) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise DatumError(f"truncated varint at byte {pos}", key)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result >= 1 << 64:
                raise DatumError(f"varint ending at byte {pos} overflows 64 bits", key)
            return result, pos
        shift += 7
        if shift >= 70:
            raise DatumError(f"varint at byte {pos} is longer than ten bytes", key)


def _int32(value: int) -> int:
    """Truncate a decoded varint to int32 exactly as protobuf does."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


_KNOWN_WIRE_TYPES = {1: 0, 2: 0, 3: 0, 4: 2, 5: 0, 6: 5, 7: 0}


def decode(value: bytes | bytearray | memoryview, key: bytes | str | None = None) -> Datum:
    """Parse a serialized Datum without copying its payload.

    ``data`` in the result is a memoryview of ``value``; keep ``value`` alive (and, for LMDB
    buffers, the transaction open) while you use it. Unknown fields are skipped as protobuf
    would; wrong wire types, truncation, overlong varints and negative dimensions raise
    :class:`DatumError`.

    Memory is bounded by the value's size, whatever its fields: at most
    :data:`DECODE_MEMORY_FACTOR` (3) times ``len(value)`` plus :data:`DECODE_MEMORY_SLACK`
    (8 MiB), checked by a test with tracemalloc. ``float_data`` split into runs by other fields
    (each float alone between unknown fields, say) is tracked as two machine integers per run in
    typed arrays, never one Python object per field, and a run of consecutive unpacked floats is
    found by one vectorized scan instead of one loop step per float.
    """
    buf = memoryview(value)
    if buf.format != "B" or buf.ndim != 1:
        buf = buf.cast("B")
    end = len(buf)
    pos = 0
    channels = height = width = label = 0
    encoded = False
    data: memoryview | bytes = b""
    # float_data runs: start offset and count (negative for a packed run: 4-byte stride, not 5)
    run_starts: typed_array | None = None
    run_counts: typed_array | None = None
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _read_varint(buf, pos, end, key)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise DatumError(f"field number 0 at byte {pos}", key)
        if tag == _TAG_FLOAT:
            if end - pos < 4:
                raise DatumError(f"field 6 is truncated at byte {pos}", key)
            count = _unpacked_run_length(buf, pos, end)
            if run_starts is None or run_counts is None:
                run_starts, run_counts = _run_arrays(end)
            if run_counts and run_counts[-1] > 0 and run_starts[-1] + 5 * run_counts[-1] == pos:
                run_counts[-1] += count
            else:
                run_starts.append(pos)
                run_counts.append(count)
            pos += 5 * count - 1
            continue
        if number == 6 and wire_type == 2:  # a packed float_data, which parsers must accept
            length, pos = _read_varint(buf, pos, end, key)
            if length > end - pos or length % 4:
                raise DatumError(f"packed float_data of {length} bytes at byte {pos} is truncated or ragged", key)
            if length:
                if run_starts is None or run_counts is None:
                    run_starts, run_counts = _run_arrays(end)
                run_starts.append(pos)
                run_counts.append(-(length // 4))
            pos += length
            continue
        expected = _KNOWN_WIRE_TYPES.get(number)
        if expected is not None and wire_type != expected:
            raise DatumError(f"field {number} has wire type {wire_type}, expected {expected}", key)
        if wire_type == 0:
            if pos < end and buf[pos] < 0x80:
                raw = buf[pos]
                pos += 1
            else:
                raw, pos = _read_varint(buf, pos, end, key)
            if number == 1:
                channels = _int32(raw)
            elif number == 2:
                height = _int32(raw)
            elif number == 3:
                width = _int32(raw)
            elif number == 5:
                label = _int32(raw)
            elif number == 7:
                encoded = raw != 0
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos, end, key)
            if length > end - pos:
                raise DatumError(f"field {number} declares {length} bytes but only {end - pos} remain", key)
            if number == 4:
                data = buf[pos : pos + length]
            pos += length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            if size > end - pos:
                raise DatumError(f"field {number} is truncated at byte {pos}", key)
            pos += size
        else:
            raise DatumError(f"field {number} has unsupported wire type {wire_type} (groups are not Datum fields)", key)
    for name, dim in (("channels", channels), ("height", height), ("width", width)):
        if dim < 0:
            raise DatumError(f"{name} is negative ({dim})", key)
    floats = _EMPTY_FLOATS if run_starts is None or run_counts is None else _gather_floats(buf, run_starts, run_counts)
    return Datum(channels, height, width, data, label, floats, encoded)


DECODE_MEMORY_FACTOR = 3
DECODE_MEMORY_SLACK = 8 << 20
_GALLOP_START = 16
_SMALL_RUN = 16  # runs shorter than this are gathered in vectorized batches...
_BATCH_RUNS = 4096  # ...of this many runs (< 64k floats: a few MiB of index arrays)


def _run_arrays(size: int) -> tuple[typed_array, typed_array]:
    """Typed arrays for run starts and counts: 4 bytes each when the value is under 2 GiB."""
    code = "i" if size < 1 << 31 else "q"
    return typed_array(code), typed_array(code)


def _unpacked_run_length(buf: memoryview, pos: int, end: int) -> int:
    """How many consecutive complete unpacked float fields start at ``pos - 1`` (at least 1).

    The first is known to be one (tag at ``pos - 1``, 4 bytes present). The rest are found by
    galloping: windows of 16, 32, 64... tag positions compared at once with numpy, so a run of n
    floats costs O(n) vectorized work and a lone float costs one byte comparison.
    """
    if pos + 4 >= end or buf[pos + 4] != _TAG_FLOAT:
        return 1
    first = pos - 1
    available = (end - first) // 5  # complete 5-byte fields that fit
    if available < 2:  # the next float is cut short: the main loop reports it
        return 1
    tags = np.frombuffer(buf, dtype=np.uint8, count=5 * available, offset=first)[::5]
    count, window = 2, _GALLOP_START
    while count < available:
        chunk = tags[count : count + window]
        mismatch = np.flatnonzero(chunk != _TAG_FLOAT)
        if mismatch.size:
            return count + int(mismatch[0])
        count += len(chunk)
        window *= 2
    return count


def _gather_floats(buf: memoryview, run_starts: typed_array, run_counts: typed_array) -> np.ndarray:
    """float_data from its runs: a zero-copy view for one run, else one new float32 array.

    Long runs are copied one by one (there are at most ``len(value) / 80`` of them); short runs
    in batches of :data:`_BATCH_RUNS`, with index arrays bounded by the batch, not the value.
    """
    if len(run_starts) == 1:
        return _run_view(buf, run_starts[0], run_counts[0])
    starts = np.frombuffer(run_starts, dtype=np.dtype(run_starts.typecode))
    counts = np.frombuffer(run_counts, dtype=np.dtype(run_counts.typecode))
    total = 0
    for first in range(0, len(counts), _BATCH_RUNS):
        total += int(np.abs(counts[first : first + _BATCH_RUNS].astype(np.int64)).sum())
    out = np.empty(total, dtype="<f4")
    if total == 0:
        return out
    u8 = np.frombuffer(buf, dtype=np.uint8)
    byte_offsets = np.arange(4, dtype=np.int64)
    filled = 0
    for first in range(0, len(counts), _BATCH_RUNS):
        batch_counts = counts[first : first + _BATCH_RUNS].astype(np.int64)
        batch_starts = starts[first : first + _BATCH_RUNS].astype(np.int64)
        sizes = np.abs(batch_counts)
        destinations = filled + np.cumsum(sizes) - sizes
        filled += int(sizes.sum())
        small = sizes < _SMALL_RUN
        for index in np.flatnonzero(~small).tolist():
            size = int(sizes[index])
            out[destinations[index] : destinations[index] + size] = _run_view(
                buf, int(batch_starts[index]), int(batch_counts[index])
            )
        if not small.any():
            continue
        sizes, strides = sizes[small], np.where(batch_counts[small] > 0, 5, 4)
        within = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        sources = np.repeat(batch_starts[small], sizes) + np.repeat(strides, sizes) * within
        values = u8[sources[:, np.newaxis] + byte_offsets].view("<f4").reshape(-1)
        out[np.repeat(destinations[small], sizes) + within] = values
    return out


def _run_view(buf: memoryview, start: int, count: int) -> np.ndarray:
    """One run as a read-only view: packed floats directly, unpacked ones strided past their tags."""
    if count < 0:
        return np.frombuffer(buf, dtype="<f4", count=-count, offset=start)
    return np.ndarray((count,), dtype="<f4", buffer=buf, offset=start, strides=(5,))


def _opencv_reason(exc: cv2.error) -> str:
    """One line saying why OpenCV failed, in words for the bound a forged header trips."""
    text = str(getattr(exc, "err", "") or exc).strip()
    if "CV_IO_MAX_IMAGE_PIXELS" in text:
        bound = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "?")
        return f"the image header declares more than {bound} pixels (OPENCV_IO_MAX_IMAGE_PIXELS)"
    if "CV_IO_MAX_IMAGE_WIDTH" in text or "CV_IO_MAX_IMAGE_HEIGHT" in text:
        return "the image header declares a width or height over OpenCV's bound"
    lines = text.splitlines()
    return f"OpenCV error: {lines[-1] if lines else type(exc).__name__}"


def imdecode(data: bytes | memoryview, flag: int, key: bytes | str | None = None) -> np.ndarray:
    """``cv2.imdecode`` (H x W [x C], as OpenCV returns it) that fails only with :class:`DatumError`.

    First the header is read and bounded (:func:`datumdb.imageheader.check_decodable`: an accepted
    format, pixels, bytes to decode, JPEG scans, PNG chunk lengths), so no decoder starts on an
    image over a bound. OpenCV raises ``cv2.error`` for what it refuses and returns None for bytes
    it cannot read; all of it becomes a DatumError naming ``key``. Every OpenCV decode in datumdb
    goes through here.

    ``IMREAD_GRAYSCALE`` of a colour PNG with colour-space chunks is decoded in colour and made
    grey by :mod:`datumdb.pnggray`, as Caffe's libpng 1.6.39 does it (pip's OpenCV bundles a
    libpng that ignores sRGB ICC profiles, and would differ by up to ~35 grey levels).
    """
    if not len(data):
        raise DatumError("the encoded image is empty", key)
    try:
        header = imageheader.check_decodable(data)
    except DatumError as exc:
        raise DatumError(f"cannot decode the {len(data)}-byte encoded image: {exc}", key) from None
    if header.format == "PNG" and flag == cv2.IMREAD_GRAYSCALE:
        conversion = pnggray.gray_conversion(data)
        if conversion is not None:
            return conversion.apply(_opencv_imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH, key), key)
    return _opencv_imdecode(data, flag, key)


def _opencv_imdecode(data: bytes | memoryview, flag: int, key: bytes | str | None) -> np.ndarray:
    """``cv2.imdecode`` with its exception and its None turned into :class:`DatumError`."""
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    except cv2.error as exc:
        raise DatumError(f"cannot decode the {len(data)}-byte encoded image: {_opencv_reason(exc)}", key) from None
    if image is None:
        raise DatumError(f"OpenCV cannot decode the {len(data)}-byte encoded image", key)
    return image


def imencode(extension: str, image: np.ndarray, key: bytes | str | None = None) -> bytes:
    """``cv2.imencode`` (``extension`` like ".png") whose every failure is a :class:`DatumError`."""
    try:
        ok, buf = cv2.imencode(extension, image)
    except cv2.error as exc:
        raise DatumError(f"OpenCV cannot encode the image as {extension}: {_opencv_reason(exc)}", key) from None
    if not ok:
        raise DatumError(f"OpenCV cannot encode the image as {extension}", key)
    return buf.tobytes()


def resize(image: np.ndarray, width: int, height: int, key: bytes | str | None = None) -> np.ndarray:
    """``cv2.resize`` bilinear (OpenCV's default, as Caffe) whose every failure is a :class:`DatumError`."""
    try:
        return cv2.resize(image, (width, height))
    except cv2.error as exc:
        raise DatumError(
            f"OpenCV cannot resize the {image.shape} image to {width}x{height}: {_opencv_reason(exc)}", key
        ) from None


def decode_image(
    data: bytes | memoryview, mode: ImreadMode = "unchanged", key: bytes | str | None = None
) -> np.ndarray:
    """Decode PNG/JPEG bytes with OpenCV into a (C, H, W) uint8 array (BGR for colour)."""
    try:
        flag = _IMREAD_FLAGS[mode]
    except KeyError:
        raise DatumError(f"unknown imread mode {mode!r}; use one of {sorted(_IMREAD_FLAGS)}", key) from None
    image = imdecode(data, flag, key)
    if image.dtype != np.uint8:
        raise DatumError(f"encoded image decodes to {image.dtype}; Caffe Datums hold 8-bit images", key)
    return hwc_to_chw(image)


def datum_to_array(datum: Datum, *, imread: ImreadMode = "unchanged", key: bytes | str | None = None) -> np.ndarray:
    """The (C, H, W) array a Datum holds: uint8 for ``data``/encoded, float32 for ``float_data``.

    Raw data is returned as a read-only view of the serialized bytes (no copy); encoded images
    are decoded with OpenCV (``imread`` = "unchanged", as Caffe does, or forced "color"/"gray").
    """
    if datum.encoded:
        return decode_image(datum.data, imread, key)
    size = datum.channels * datum.height * datum.width
    if len(datum.data):
        if len(datum.data) != size:
            raise DatumError(
                f"channels*height*width = {datum.channels}*{datum.height}*{datum.width} = {size} "
                f"but data holds {len(datum.data)} bytes",
                key,
            )
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(datum.shape)
    if datum.float_data.size != size:
        raise DatumError(
            f"channels*height*width = {size} but float_data holds {datum.float_data.size} values (and data is empty)",
            key,
        )
    if size == 0:
        raise DatumError("Datum holds no data, no float_data and no encoded image", key)
    return datum.float_data.reshape(datum.shape)


class RawLayout:
    """The byte layout shared by raw uint8 Datums of one shape (Caffe's CVMatToDatum output).

    Almost every training database is uniform (every value a raw uint8 Datum of one shape), so
    every value is ``header + payload + label tail``. :meth:`label` recognises one with two byte
    comparisons and :meth:`array` slices its payload: the readers' fast path
    (:mod:`datumdb.fastpath`), exact because anything else returns None and takes :func:`decode`.
    """

    __slots__ = ("header", "shape", "size", "tail_start")

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self.size = shape[0] * shape[1] * shape[2]
        fields = b"".join(bytes([tag]) + _varint(value) for tag, value in zip((0x08, 0x10, 0x18), shape, strict=True))
        self.header = fields + b"\x22" + _varint(self.size)
        self.tail_start = len(self.header) + self.size

    @classmethod
    def of(cls, value: bytes | memoryview) -> RawLayout | None:
        """The layout of ``value`` if it is a raw uint8 Datum in Caffe's field order, else None."""
        try:
            datum = decode(value)
        except ValueError:
            return None
        if datum.encoded or datum.float_data.size or not datum.channels * datum.height * datum.width:
            return None
        layout = cls(datum.shape)
        return layout if layout.label(value) is not None else None

    def label(self, value: bytes | memoryview) -> int | None:
        """The label if ``value`` has exactly this layout (header, payload, label, encoded=false)."""
        end = len(value)
        start = self.tail_start
        if end < start + 4 or value[start] != 0x28 or value[end - 2] != 0x38 or value[end - 1] != 0:
            return None
        if value[: len(self.header)] != self.header:
            return None
        if end == start + 4:  # the usual one-byte label 0..127
            return value[start + 1] if value[start + 1] < 0x80 else None
        try:
            raw, position = _read_varint(memoryview(value), start + 1, end, None)
        except ValueError:
            return None
        if position != end - 2:
            return None
        raw &= 0xFFFFFFFF
        return raw - (1 << 32) if raw & 0x80000000 else raw

    def array(self, value: bytes | memoryview) -> np.ndarray:
        return np.frombuffer(value, dtype=np.uint8, count=self.size, offset=len(self.header)).reshape(self.shape)

    @staticmethod
    def tail(label: int) -> bytes:
        """What follows the payload: the label field and ``encoded=false`` (3 + varint bytes)."""
        return _raw_tail(label)

    def labels(self, buffer: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
        """:meth:`label` of many values at once: ``buffer[starts[i]:ends[i]]`` is value ``i``.

        The int64 labels if every value has exactly this layout, else None (then check them one
        by one). The same rules as :meth:`label`, vectorized so that verify spends no Python per
        record of a uniform database: header bytes, the label tag right after the payload, a
        varint of 1 to 10 bytes (continuation bits exactly on all but its last byte, no overflow
        of 64 bits), ``encoded=false`` last, and the label truncated to int32 as protobuf does.
        """
        count = len(starts)
        if count == 0:
            return np.empty(0, dtype=np.int64)
        varint_length = ends - starts - self.tail_start - 3
        if varint_length.min() < 1 or varint_length.max() > _MAX_VARINT:
            return None
        header = np.frombuffer(self.header, dtype=np.uint8)
        if not (buffer[starts[:, np.newaxis] + np.arange(len(header))] == header).all():
            return None
        tag = starts + self.tail_start
        if (buffer[tag] != _TAG_LABEL).any() or (buffer[ends - 2] != _TAG_ENCODED).any() or buffer[ends - 1].any():
            return None
        if varint_length.max() == 1:  # labels 0..127, the usual case: one byte without a continuation bit
            labels = buffer[tag + 1]
            return None if (labels >= 0x80).any() else labels.astype(np.int64)
        position = np.arange(_MAX_VARINT)
        inside = position < varint_length[:, np.newaxis]
        raw = np.where(inside, buffer[np.minimum(tag[:, np.newaxis] + 1 + position, len(buffer) - 1)], 0)
        if ((raw >= 0x80) != (position < varint_length[:, np.newaxis] - 1)).any():
            return None  # a continuation bit missing inside the varint, or set on its last byte
        if (raw[:, _MAX_VARINT - 1] > 1).any():
            return None  # a tenth byte above 1 overflows 64 bits
        groups = (raw & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
        value = np.bitwise_or.reduce(groups, axis=1) & np.uint64(0xFFFFFFFF)
        return value.astype(np.int64) - ((value >= 0x80000000).astype(np.int64) << 32)
