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
  :class:`~datumdb.errors.DatumError` naming the key.

The generated classes (``datumdb.proto.datum_pb2``) remain the reference implementation and are
used for ``BlobProto`` (mean files), where speed does not matter.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# OpenCV reads this once, at the first decode: cap the pixels an encoded image may declare, so
# a forged PNG/JPEG header cannot make imdecode allocate gigabytes. 2**25 pixels (5792 x 5792,
# 100 MB as BGR) is far beyond any training image; the user's own setting wins.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 25))
import cv2

from datumdb.errors import DatumError

__all__ = [
    "Datum",
    "ImreadMode",
    "check_label",
    "datum_to_array",
    "decode",
    "decode_image",
    "encode_array",
    "encode_image",
    "encode_png_or_jpg",
    "encode_sample",
    "hwc_to_chw",
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
        return _raw_header(array.shape) + array.tobytes() + _raw_tail(label)
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
    return head + bytes([_TAG_LABEL]) + _varint(label) + wire.tobytes() + bytes([_TAG_ENCODED, 0])


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
    label = check_label(label, key)
    if not image:
        raise DatumError("an encoded Datum needs non-empty image bytes", key)
    head = _shape_fields(shape, key) if shape is not None else b""
    return head + bytes([_TAG_DATA]) + _varint(len(image)) + bytes(image) + _tail(label, True)


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
    ok, buf = cv2.imencode("." + encoding, np.ascontiguousarray(hwc))
    if not ok:
        raise DatumError(f"OpenCV could not {encoding}-encode the image", key)
    return buf.tobytes()


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
    """
    buf = memoryview(value)
    if buf.format != "B" or buf.ndim != 1:
        buf = buf.cast("B")
    end = len(buf)
    pos = 0
    channels = height = width = label = 0
    encoded = False
    data: memoryview | bytes = b""
    float_runs: list[tuple[int, int, bool]] = []  # (offset, count, packed)
    while pos < end:
        tag, pos = _read_varint(buf, pos, end, key)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise DatumError(f"field number 0 at byte {pos}", key)
        expected = _KNOWN_WIRE_TYPES.get(number)
        if number == 6 and wire_type == 2:  # a packed float_data, which parsers must accept
            length, pos = _read_varint(buf, pos, end, key)
            if length > end - pos or length % 4:
                raise DatumError(f"packed float_data of {length} bytes at byte {pos} is truncated or ragged", key)
            float_runs.append((pos, length // 4, True))
            pos += length
            continue
        if expected is not None and wire_type != expected:
            raise DatumError(f"field {number} has wire type {wire_type}, expected {expected}", key)
        if wire_type == 0:
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
            if number == 6:
                if float_runs and not float_runs[-1][2] and float_runs[-1][0] + 5 * float_runs[-1][1] == pos:
                    offset, count, _ = float_runs[-1]
                    float_runs[-1] = (offset, count + 1, False)
                else:
                    float_runs.append((pos, 1, False))
            pos += size
        else:
            raise DatumError(f"field {number} has unsupported wire type {wire_type} (groups are not Datum fields)", key)
    for name, dim in (("channels", channels), ("height", height), ("width", width)):
        if dim < 0:
            raise DatumError(f"{name} is negative ({dim})", key)
    return Datum(channels, height, width, data, label, _float_view(buf, float_runs), encoded)


def _float_view(buf: memoryview, runs: list[tuple[int, int, bool]]) -> np.ndarray:
    if not runs:
        return _EMPTY_FLOATS
    parts = []
    for offset, count, packed in runs:
        if packed:
            parts.append(np.frombuffer(buf, dtype="<f4", count=count, offset=offset))
        else:  # tag byte + 4 bytes each: a strided view skips the tags without copying
            parts.append(np.ndarray((count,), dtype="<f4", buffer=buf, offset=offset, strides=(5,)))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png_chunks(data: bytes | memoryview, key: bytes | str | None) -> None:
    """Reject a PNG whose chunk lengths exceed its bytes before OpenCV sees it.

    Found by fuzzing: OpenCV 5's PNG reader allocates what a chunk header declares, so a
    972-byte PNG claiming a 4 GB chunk made it allocate 4 GB. Such a file is truncated or
    forged either way; walking the chunk headers is cheap (a handful per image).
    """
    view = memoryview(data)
    end = len(view)
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= end:
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        if length > end - pos - 12:
            raise DatumError(
                f"PNG chunk {kind!r} at byte {pos} declares {length} bytes but only {max(end - pos - 12, 0)} remain",
                key,
            )
        pos += 12 + length
        if kind == b"IEND":
            return


def decode_image(
    data: bytes | memoryview, mode: ImreadMode = "unchanged", key: bytes | str | None = None
) -> np.ndarray:
    """Decode PNG/JPEG bytes with OpenCV into a (C, H, W) uint8 array (BGR for colour)."""
    try:
        flag = _IMREAD_FLAGS[mode]
    except KeyError:
        raise DatumError(f"unknown imread mode {mode!r}; use one of {sorted(_IMREAD_FLAGS)}", key) from None
    if bytes(data[:8]) == _PNG_SIGNATURE:
        _check_png_chunks(data, key)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag) if len(data) else None
    if image is None:
        raise DatumError(f"OpenCV cannot decode the {len(data)}-byte encoded image", key)
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
